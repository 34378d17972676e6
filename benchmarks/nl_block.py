"""Non-local block forward+backward: time, GFLOP/s, fraction of matmul peak, peak memory.

    python -m benchmarks.nl_block                       # every case, every path
    python -m benchmarks.nl_block --cases res3_8x8 res4_8x8 --json results.json

Cases are the non-local blocks of the paper's models (res3 / res4 of the Kinetics nets,
NonLocalNet's head on Cityscapes; CASES below) with training batch sizes
(Kinetics: 8 clips per device; Cityscapes: 2 crops per device; whole-image
test: 1). For each case and attention path (einsum, chunked, and ``xla`` =
``jax.nn.dot_product_attention``), the block's
fwd+bwd (gradients w.r.t. parameters and input) is compiled once and timed
(median of --repeats; not timed, shown as nan, when its compiled memory
exceeds --skip_above_bytes); peak memory is XLA's compiled memory analysis
(arguments + outputs + temporaries). In the same run: this machine's matmul
peak (a large float32 XLA dot) and a PyTorch eager reference of the same
block (official structure), with the same number of threads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import host_malloc
from benchmarks.timing import in_fresh_process, median_seconds
from nonlocal_jax import NonLocalBlock

# name: (input shape B, *positions, C; pool window or None)
CASES = {
    "res3_8x8": ((8, 4, 28, 28, 512), (1, 2, 2)),
    "res4_8x8": ((8, 4, 14, 14, 1024), (1, 2, 2)),
    "res3_128f_pooled": ((2, 16, 28, 28, 512), (1, 2, 2)),
    "res3_128f_unpooled": ((2, 16, 28, 28, 512), None),
    "seg_512x1024": ((2, 64, 128, 512), None),
    "seg_whole_1024x2048": ((1, 128, 256, 512), None),
}
PATHS = ("einsum", "chunked", "xla")


def analytic_flops(shape: tuple[int, ...], window) -> float:
  """Multiply-adds x 2 of the embedded-Gaussian block, fwd + bwd (bwd = 2 x fwd)."""
  batch, *positions, c = shape
  n = int(np.prod(positions))
  nk = n // int(np.prod(window)) if window else n
  d = c // 2
  projections = n * c * d * 2 + nk * c * d * 2  # theta, W_z on N; phi, g on Nk
  attention = 2 * n * nk * d
  return 3 * 2 * batch * (projections + attention)


def jax_case(shape, window, path: str, repeats: int, skip_above_bytes: float) -> dict:
  """Compiles the block's fwd+bwd for one path; times it unless it needs too much memory."""
  block = NonLocalBlock(shape[-1], pool_window=window, final_norm="none", attention_path=path,
                        rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(block)

  def loss(params, x):
    return jnp.sum(nnx.merge(graphdef, params)(x))

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  compiled = step.lower(params, x).compile()
  memory = compiled.memory_analysis()
  peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes
          + memory.temp_size_in_bytes)
  if peak > skip_above_bytes:
    return {"seconds": float("nan"), "peak_bytes": int(peak)}
  x = jax.random.normal(jax.random.key(0), shape, jnp.float32)
  seconds = median_seconds(lambda: jax.block_until_ready(compiled(params, x)), repeats)
  return {"seconds": seconds, "peak_bytes": int(peak)}


def torch_case(shape, window, repeats: int) -> dict:
  """PySlowFast-structured Nonlocal in PyTorch eager (NCTHW / NCHW), fwd + bwd."""
  import torch

  torch.set_num_threads(os.cpu_count())
  batch, *positions, c = shape
  d = c // 2
  conv = torch.nn.Conv3d if len(positions) == 3 else torch.nn.Conv2d
  pool_cls = torch.nn.MaxPool3d if len(positions) == 3 else torch.nn.MaxPool2d
  theta, phi, g, out = conv(c, d, 1), conv(c, d, 1), conv(c, d, 1), conv(d, c, 1)
  pool = pool_cls(window, window) if window else None

  def block(x):
    t = theta(x)
    xp = pool(x) if pool is not None else x
    p, v = phi(xp), g(xp)
    t, p, v = t.flatten(2), p.flatten(2), v.flatten(2)
    a = torch.einsum("nct,ncp->ntp", t, p) * d**-0.5
    a = a.softmax(dim=2)
    y = torch.einsum("ntg,ncg->nct", a, v).reshape(x.shape[0], d, *x.shape[2:])
    return x + out(y)

  x = torch.randn(batch, c, *positions, requires_grad=True)

  def step():
    for module in (theta, phi, g, out):
      module.zero_grad(set_to_none=True)
    x.grad = None
    block(x).sum().backward()

  return {"seconds": median_seconds(step, repeats)}


def matmul_peak_gflops(size: int = 4096, repeats: int = 5) -> float:
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
  dot = jax.jit(lambda a, b: a @ b)
  seconds = median_seconds(lambda: jax.block_until_ready(dot(a, a)), repeats)
  return 2 * size**3 / seconds / 1e9


def torch_matmul_peak_gflops(size: int = 4096, repeats: int = 5) -> float:
  """The same square float32 matmul in PyTorch (oneDNN / MKL kernels), same threads."""
  import torch

  torch.set_num_threads(os.cpu_count())
  a = torch.randn(size, size)
  seconds = median_seconds(lambda: a @ a, repeats)
  return 2 * size**3 / seconds / 1e9


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
  parser.add_argument("--paths", nargs="*", default=list(PATHS), choices=PATHS)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--no_torch", action="store_true", help="skip the PyTorch reference")
  parser.add_argument("--skip_above_bytes", type=float, default=16e9,
                      help="skip a path whose compiled peak memory would exceed this")
  parser.add_argument("--json", help="write the rows to this file")
  host_malloc.add_argument(parser)
  args = parser.parse_args(argv)

  allocator = host_malloc.apply(args.host_malloc)
  threads = os.cpu_count()
  peak = matmul_peak_gflops()
  torch_peak = float("nan")
  if not args.no_torch:
    torch_peak = in_fresh_process(torch_matmul_peak_gflops, host_malloc=args.host_malloc)
  print(f"# {platform.processor() or platform.machine()}, {threads} cores, jax "
        f"{jax.__version__} on {jax.devices()[0].platform}, host malloc {allocator}; "
        f"matmul peak {peak:.1f} GFLOP/s (XLA), {torch_peak:.1f} GFLOP/s (PyTorch)")
  rows = []
  header = (f"{'case':22} {'path':9} {'ms':>9} {'GFLOP/s':>8} {'% peak':>7} {'peak MB':>9} "
            f"{'vs torch':>8}")
  print(header)
  for case in args.cases:
    shape, window = CASES[case]
    flops = analytic_flops(shape, window)
    reference = None
    if not args.no_torch:
      reference = in_fresh_process(torch_case, shape, window, args.repeats,
                                   host_malloc=args.host_malloc)["seconds"]
      rows.append({"case": case, "path": "torch_eager", "seconds": reference,
                   "gflops": flops / reference / 1e9})
      print(f"{case:22} {'torch':9} {reference * 1e3:9.1f} {flops / reference / 1e9:8.1f} "
            f"{100 * flops / reference / 1e9 / peak:6.1f}% {'':>9} {'1.00':>8}")
    for path in args.paths:
      result = jax_case(shape, window, path, args.repeats, args.skip_above_bytes)
      gflops = flops / result["seconds"] / 1e9
      speedup = reference / result["seconds"] if reference else float("nan")
      rows.append({"case": case, "path": path, **result, "gflops": gflops,
                   "fraction_of_peak": gflops / peak, "speedup_vs_torch": speedup})
      print(f"{case:22} {path:9} {result['seconds'] * 1e3:9.1f} {gflops:8.1f} "
            f"{100 * gflops / peak:6.1f}% {result['peak_bytes'] / 2**20:9.0f} {speedup:8.2f}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"matmul_peak_gflops": peak, "torch_matmul_peak_gflops": torch_peak,
                 "threads": threads, "host_malloc": allocator, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
