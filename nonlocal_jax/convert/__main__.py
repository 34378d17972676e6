"""Command line of the converters: ``python -m nonlocal_jax.convert --help``.

    python -m nonlocal_jax.convert --from pyslowfast --model i3d_nl5_r50 \
        --input I3D_NLN_8x8_R50.pyth --output ~/ckpt/i3d_nl5_r50_psf
    python -m nonlocal_jax.convert --from torchvision --model i3d_nl5_r50 \
        --input resnet50.pth --output ~/ckpt/i3d_nl5_r50_in1k --drop_head --fresh_nonlocal

Writes a weights checkpoint with ``model.json`` (preset and constructor
arguments); prints what it did and the config overrides the weights need.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
from collections.abc import Sequence

from nonlocal_jax import checkpoints
from nonlocal_jax.convert import SOURCES, convert, read_source
from nonlocal_jax.models.registry import list_models


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m nonlocal_jax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--from", dest="source", required=True, choices=SOURCES,
                      help="framework that wrote --input")
  parser.add_argument("--model", required=True,
                      help="model preset (nonlocal_jax.models.list_models())")
  parser.add_argument("--input", required=True, help="checkpoint file to convert")
  parser.add_argument("--output", required=True, help="new directory for our checkpoint")
  parser.add_argument("--model_kwargs", default="{}",
                      help="JSON of constructor overrides, e.g. "
                           "'{\"nonlocal_blocks\": [[], [1, 3], [1, 3, 5], []]}'")
  parser.add_argument("--num_classes", type=int, default=None,
                      help="classifier outputs (default: the checkpoint's)")
  parser.add_argument("--drop_head", action="store_true",
                      help="leave out the classifier (fine-tuning on other classes)")
  parser.add_argument("--fresh_nonlocal", action="store_true",
                      help="initialise non-local blocks the checkpoint does not have")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
  args = _parse(argv)
  if args.model not in list_models():
    sys.exit(f"unknown --model {args.model!r}; known: {', '.join(list_models())}")
  output = os.path.abspath(os.path.expanduser(args.output))
  if os.path.exists(output):
    sys.exit(f"--output {output!r} exists; refusing to overwrite it")
  try:
    model_kwargs = json.loads(args.model_kwargs)
  except json.JSONDecodeError as e:
    sys.exit(f"--model_kwargs is not valid JSON ({e}): {args.model_kwargs!r}")
  try:
    weights = read_source(args.source, args.input)
    result = convert(args.source, weights, args.model, model_kwargs=model_kwargs,
                     num_classes=args.num_classes, drop_head=args.drop_head,
                     fresh_nonlocal=args.fresh_nonlocal)
  except (ValueError, FileNotFoundError, ImportError, pickle.UnpicklingError) as e:
    sys.exit(f"error: {e}")
  spec = {"name": result.model_name, "num_classes": result.num_classes,
          "kwargs": result.model_kwargs, "drop_head": args.drop_head, "source": args.source,
          "input": os.path.abspath(args.input)}
  checkpoints.save_weights(result.weights, output, model_spec=spec)
  print(f"wrote {output}: {len(result.weights)} arrays of {args.model} from {args.input}")
  if result.fresh:
    print(f"  left at init ({len(result.fresh)}): the non-local blocks "
          + ", ".join(sorted({"/".join(p[:4]) for p in result.fresh})))
  if result.dropped:
    print(f"  classifier left out: {', '.join(result.dropped)} (load with init_head=False)")
  if result.model_kwargs:
    print(f"  the weights need the model built with {json.dumps(result.model_kwargs)} "
          "(saved in model.json for load_model; a training config must set the same "
          "config.model.kwargs)")


if __name__ == "__main__":
  main()
