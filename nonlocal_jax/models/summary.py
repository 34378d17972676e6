"""Table of registered models: input shape, parameters and FLOPs, computed by code.

    python -m nonlocal_jax.models.summary [--json FILE] [NAME ...]

Nothing is allocated: the model is built with ``nnx.eval_shape`` and the
forward pass (eval mode, batch 1) is only lowered; FLOPs are XLA's cost
analysis of that program (one multiply-add counts as 2 FLOPs).
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
from flax import nnx

from nonlocal_jax.models.registry import create_model, eval_mode, get_spec, list_models

NUM_CLASSES = {"video": 400, "image": 1000, "segmentation": 19, "detection": 91}
# How the table runs a model of each task (default: model(x)); a detector's inference forward.
FORWARD = {"detection": lambda model, x: model.detect(x, jnp.array([x.shape[1:3]] * x.shape[0]))}


def summarize(name: str) -> dict:
  """{'name', 'task', 'input_shape', 'num_classes', 'params', 'gflops'} of one preset."""
  spec = get_spec(name)
  num_classes = NUM_CLASSES[spec.task]
  model = nnx.eval_shape(lambda: create_model(name, num_classes=num_classes, rngs=nnx.Rngs(0)))
  params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  graphdef, state = nnx.split(eval_mode(model))
  x = jax.ShapeDtypeStruct((1, *spec.input_shape), jnp.float32)
  forward = FORWARD.get(spec.task, lambda model, x: model(x))
  lowered = jax.jit(lambda s, x: forward(nnx.merge(graphdef, s), x)).lower(state, x)
  return dict(name=name, task=spec.task, input_shape=list(spec.input_shape),
              num_classes=num_classes, params=int(params),
              gflops=lowered.cost_analysis()["flops"] / 1e9)


def markdown_table(rows: list[dict]) -> str:
  lines = ["| model | task | input (T,H,W,C / H,W,C) | classes | params (M) | GFLOPs |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    shape = "x".join(map(str, r["input_shape"]))
    lines.append(f"| `{r['name']}` | {r['task']} | {shape} | {r['num_classes']} | "
                 f"{r['params'] / 1e6:.2f} | {r['gflops']:.4g} |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("names", nargs="*", help="models to summarize (default: all)")
  parser.add_argument("--json", help="also write the rows to this JSON file")
  args = parser.parse_args(argv)
  rows = [summarize(name) for name in (args.names or list_models())]
  print(markdown_table(rows))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
