"""The pairwise term of the non-local operation over flattened positions.

    y_i = 1/C(x) * sum_j f(x_i, x_j) g(x_j)

Queries `q` (B, N, Dq), keys `k` (B, M, Dq) and values `v` (B, M, Dv) are the
embedded, flattened positions (M may be smaller than N after subsampling).
Every instantiation of the paper is one of three normalisations of one of two
pairwise scores:

=================== ========= ================= ==============================
instantiation       score     normalisation     f / C(x)
=================== ========= ================= ==============================
embedded Gaussian   ``dot``   ``softmax``       softmax_j(q_i . k_j)
Gaussian            ``dot``   ``softmax``       softmax_j(x_i . x_j)
dot product         ``dot``   ``mean``          (q_i . k_j) / M
concatenation       ``sum``   ``relu_mean``     ReLU(q_i + k_j) / M
=================== ========= ================= ==============================

For concatenation, ReLU(w_f^T [theta_i, phi_j]) = ReLU(a.theta_i + b.phi_j),
so the caller passes the projected scalars q = theta @ a (B, N, 1) and
k = phi @ b (B, M, 1) and the ``sum`` score adds them; no (N, M, 2d) tensor is
ever built. Any logit scale (1/sqrt(d)) is folded into `q` by the caller.

Two exact implementations:

* :func:`attend_einsum` materialises the (B, N, M) weight matrix.
* :func:`attend_chunked` streams over blocks of keys (online softmax) and has a
  custom VJP that recomputes each block, so neither the forward nor the
  backward pass holds more than (B, N, chunk_size) pairwise values.

Scores, softmax and accumulators are float32 for float32 and lower-precision
inputs (bf16), float64 for float64 inputs (jax x64).
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp

Score = Literal["dot", "sum"]
Normalization = Literal["softmax", "mean", "relu_mean"]

SCORES = ("dot", "sum")
NORMALIZATIONS = ("softmax", "mean", "relu_mean")


def _check(q: jax.Array, k: jax.Array, v: jax.Array, score: str, normalization: str) -> None:
  if score not in SCORES:
    raise ValueError(f"score={score!r} is not one of {SCORES}")
  if normalization not in NORMALIZATIONS:
    raise ValueError(f"normalization={normalization!r} is not one of {NORMALIZATIONS}")
  if q.ndim != 3 or k.ndim != 3 or v.ndim != 3:
    raise ValueError(
        f"q, k, v must be (B, N, D), (B, M, D), (B, M, Dv); got shapes {q.shape}, {k.shape}, {v.shape}")
  if k.shape[:2] != v.shape[:2] or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
    raise ValueError(f"inconsistent shapes q={q.shape}, k={k.shape}, v={v.shape}")
  if score == "sum" and q.shape[-1] != 1:
    raise ValueError(f"the 'sum' score takes scalar embeddings (B, N, 1); got q of shape {q.shape}")


def accumulator_dtype(*arrays: jax.Array) -> jnp.dtype:
  """float32, or float64 when an input is float64: the dtype of scores and sums."""
  return jnp.promote_types(jnp.float32, jnp.result_type(*arrays))


def pairwise_scores(q: jax.Array, k: jax.Array, score: Score) -> jax.Array:
  """Raw scores s_ij (B, N, M) in the accumulator dtype."""
  acc = accumulator_dtype(q, k)
  if score == "dot":
    return jnp.einsum("bnd,bmd->bnm", q, k, preferred_element_type=acc)
  return q.astype(acc) + jnp.swapaxes(k, 1, 2).astype(acc)


def _score_vjp(ds: jax.Array, q: jax.Array, k: jax.Array, score: Score) -> tuple[jax.Array, jax.Array]:
  """Gradients of `pairwise_scores` w.r.t. q and k given ds (B, N, M)."""
  if score == "dot":
    dq = jnp.einsum("bnm,bmd->bnd", ds, k, preferred_element_type=ds.dtype)
    dk = jnp.einsum("bnm,bnd->bmd", ds, q, preferred_element_type=ds.dtype)
    return dq, dk
  return ds.sum(axis=2, keepdims=True), jnp.swapaxes(ds.sum(axis=1, keepdims=True), 1, 2)


def attention_weights(q: jax.Array, k: jax.Array, score: Score, normalization: Normalization) -> jax.Array:
  """The matrix f(x_i, x_j) / C(x) (B, N, M) in the accumulator dtype."""
  s = pairwise_scores(q, k, score)
  num_keys = k.shape[1]
  if normalization == "softmax":
    return jax.nn.softmax(s, axis=-1)
  if normalization == "mean":
    return s / num_keys
  return jax.nn.relu(s) / num_keys


def attend_einsum(q: jax.Array, k: jax.Array, v: jax.Array, score: Score = "dot",
                  normalization: Normalization = "softmax") -> jax.Array:
  """y = (f / C) @ v with the full (B, N, M) matrix. Returns (B, N, Dv) in v.dtype."""
  _check(q, k, v, score, normalization)
  w = attention_weights(q, k, score, normalization)
  y = jnp.einsum("bnm,bmd->bnd", w.astype(v.dtype), v,
                 preferred_element_type=accumulator_dtype(w, v))
  return y.astype(v.dtype)


def attend_dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                                 implementation: str | None = None) -> jax.Array:
  """Softmax attention through ``jax.nn.dot_product_attention`` (one head, q pre-scaled).

  Only for the softmax instantiations; XLA picks its own kernel (cuDNN flash
  attention on GPUs with ``implementation='cudnn'``). Returns (B, N, Dv).
  """
  _check(q, k, v, "dot", "softmax")
  if q.shape[-1] != v.shape[-1]:
    raise ValueError(f"jax.nn.dot_product_attention needs equal key and value widths; "
                     f"got {q.shape[-1]} and {v.shape[-1]}")
  y = jax.nn.dot_product_attention(q[:, :, None], k[:, :, None], v[:, :, None], scale=1.0,
                                   implementation=implementation)
  return y[:, :, 0]


def _key_blocks(x: jax.Array, chunk_size: int) -> jax.Array:
  """(B, M, D) -> (num_chunks, B, chunk_size, D), zero-padded at the end."""
  b, m, d = x.shape
  num_chunks = -(-m // chunk_size)
  x = jnp.pad(x, ((0, 0), (0, num_chunks * chunk_size - m), (0, 0)))
  return x.reshape(b, num_chunks, chunk_size, d).swapaxes(0, 1)


def _unblock(x: jax.Array, num_keys: int) -> jax.Array:
  """Inverse of `_key_blocks`: (num_chunks, B, chunk, D) -> (B, M, D)."""
  n, b, c, d = x.shape
  return x.swapaxes(0, 1).reshape(b, n * c, d)[:, :num_keys]


def _valid_mask(num_keys: int, chunk_size: int) -> jax.Array:
  num_chunks = -(-num_keys // chunk_size)
  return (jnp.arange(num_chunks * chunk_size) < num_keys).reshape(num_chunks, chunk_size)


def _activate(s: jax.Array, normalization: Normalization) -> jax.Array:
  return jax.nn.relu(s) if normalization == "relu_mean" else s


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _chunked(q, k, v, score, normalization, chunk_size):
  return _chunked_fwd(q, k, v, score, normalization, chunk_size)[0]


def _chunked_fwd(q, k, v, score, normalization, chunk_size):
  b, n, _ = q.shape
  num_keys, dv = v.shape[1], v.shape[2]
  acc_dtype = accumulator_dtype(q, k, v)
  xs = (_key_blocks(k, chunk_size), _key_blocks(v, chunk_size), _valid_mask(num_keys, chunk_size))
  if normalization == "softmax":
    def body(carry, blk):
      m, l, acc = carry
      kb, vb, valid = blk
      s = jnp.where(valid, pairwise_scores(q, kb, score), -jnp.inf)
      m_new = jnp.maximum(m, s.max(axis=-1))
      p = jnp.exp(s - m_new[..., None])
      correction = jnp.exp(m - m_new)
      l = l * correction + p.sum(axis=-1)
      acc = acc * correction[..., None] + jnp.einsum(
          "bnc,bcd->bnd", p.astype(v.dtype), vb, preferred_element_type=acc_dtype)
      return (m_new, l, acc), None

    init = (jnp.full((b, n), -jnp.inf, acc_dtype), jnp.zeros((b, n), acc_dtype),
            jnp.zeros((b, n, dv), acc_dtype))
    (m, l, acc), _ = jax.lax.scan(body, init, xs)
    out = (acc / l[..., None]).astype(v.dtype)
    stat = m + jnp.log(l)  # log-sum-exp of every row
  else:
    # Padded values are zero, so padded keys add nothing and need no mask.
    def body(acc, blk):
      kb, vb, _ = blk
      w = _activate(pairwise_scores(q, kb, score), normalization)
      return acc + jnp.einsum("bnc,bcd->bnd", w.astype(v.dtype), vb,
                              preferred_element_type=acc_dtype), None

    acc, _ = jax.lax.scan(body, jnp.zeros((b, n, dv), acc_dtype), xs)
    out = (acc / num_keys).astype(v.dtype)
    stat = jnp.zeros((b, n), acc_dtype)
  return out, (q, k, v, out, stat)


def _chunked_bwd(score, normalization, chunk_size, residuals, d_out):
  q, k, v, out, stat = residuals
  num_keys = k.shape[1]
  acc_dtype = accumulator_dtype(q, k, v)
  d_out = d_out.astype(acc_dtype)
  xs = (_key_blocks(k, chunk_size), _key_blocks(v, chunk_size), _valid_mask(num_keys, chunk_size))
  if normalization == "softmax":
    delta = jnp.sum(d_out * out.astype(acc_dtype), axis=-1)  # (B, N)

  def body(dq, blk):
    kb, vb, valid = blk
    s = pairwise_scores(q, kb, score)
    dw = jnp.einsum("bnd,bcd->bnc", d_out, vb, preferred_element_type=acc_dtype)
    if normalization == "softmax":
      w = jnp.where(valid, jnp.exp(s - stat[..., None]), 0.0)
      ds = w * (dw - delta[..., None])
    else:
      w = _activate(s, normalization) / num_keys
      ds = dw / num_keys
      if normalization == "relu_mean":
        ds = jnp.where(s > 0, ds, 0.0)
    dvb = jnp.einsum("bnc,bnd->bcd", w, d_out, preferred_element_type=acc_dtype)
    dq_blk, dkb = _score_vjp(ds, q, kb, score)
    return dq + dq_blk, (dkb, dvb)

  dq, (dk, dv) = jax.lax.scan(body, jnp.zeros(q.shape, acc_dtype), xs)
  return (dq.astype(q.dtype), _unblock(dk, num_keys).astype(k.dtype),
          _unblock(dv, num_keys).astype(v.dtype))


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def attend_chunked(q: jax.Array, k: jax.Array, v: jax.Array, score: Score = "dot",
                   normalization: Normalization = "softmax", chunk_size: int = 512) -> jax.Array:
  """Same result as :func:`attend_einsum`, streaming over blocks of `chunk_size` keys.

  Peak memory holds (B, N, chunk_size) scores instead of (B, N, M), in the
  forward and in the backward pass (custom VJP, blocks are recomputed).
  Returns (B, N, Dv) in v.dtype.
  """
  _check(q, k, v, score, normalization)
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
  chunk_size = min(chunk_size, k.shape[1])
  return _chunked(q, k, v, score, normalization, chunk_size)


def einsum_bytes(q: jax.Array, k: jax.Array) -> int:
  """Bytes of one float32 (B, N, M) score matrix: what the einsum path materialises."""
  return 4 * q.shape[0] * q.shape[1] * k.shape[1]
