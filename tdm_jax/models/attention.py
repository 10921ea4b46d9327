"""Scaled dot-product attention behind one function, with a choice of implementation.

"xla": plain einsum + softmax (softmax in float32), runs everywhere and is what parity tests use. It
materialises the whole (batch, heads, q_length, kv_length) float32 logits.
"chunked": memory-efficient attention in plain XLA. Queries are processed `chunk_size` at a time
(`lax.map`), and keys/values `kv_chunk_size` at a time with an online (running max / running sum)
softmax when kv_length exceeds it; statistics and accumulation in float32. The working set of one step
is (batch, heads, chunk_size, kv_chunk_size), which keeps it in cache: on CPU this is 2-5x faster
than "xla" for 1024+ tokens. Each block step is rematerialised, so the backward pass keeps the
running statistics per block, never the stacked logits of every block (at SDXL's 4096 tokens,
batch 16, those would be 5 GiB per attention). Equal to "xla" up to float32 rounding, also for
masks and causal.
"dot_product_attention": `jax.nn.dot_product_attention` (cuDNN flash attention on GPUs when the
shapes and dtypes allow, XLA otherwise). Sequences shorter than `min_fused_length` take the plain
path, where a fused kernel gains nothing.
"auto": decided at trace time by `jax.devices()[0].platform`: on GPU "dot_product_attention"; elsewhere
"chunked" for q_length >= `min_fused_length` and "xla" below it (short sequences gain nothing from
chunking and pay for the loop).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

IMPLEMENTATIONS = ("xla", "chunked", "dot_product_attention", "auto")


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: Optional[jax.Array] = None,
              causal: bool = False, implementation: str = "auto", min_fused_length: int = 256,
              chunk_size: int = 256, kv_chunk_size: int = 1024) -> jax.Array:
  """Multi-head attention over (batch, length, heads, head_dim) inputs.

  mask: boolean, broadcastable to (batch, heads, q_length, kv_length); True means attend. A query
  row with every key masked attends uniformly to all keys (as in the plain path).
  causal: query i attends to keys j <= i + kv_length - q_length (bottom-right aligned).
  chunk_size, kv_chunk_size: query and key block lengths of "chunked" (and of "auto" on CPU).
  Returns (batch, q_length, heads, head_dim) in v's dtype.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {implementation!r} is not one of {IMPLEMENTATIONS}")
  long_enough = q.shape[1] >= min_fused_length
  if implementation == "auto":
    if jax.devices()[0].platform == "gpu":
      implementation = "dot_product_attention"
    else:
      implementation = "chunked" if long_enough else "xla"
  if implementation == "dot_product_attention" and long_enough:
    q_len, kv_len = q.shape[1], k.shape[1]
    if causal and q_len != kv_len:  # is_causal aligns top-left; ours (and the plain path) bottom-right
      tri = jnp.tril(jnp.ones((q_len, kv_len), bool), k=kv_len - q_len)
      mask = tri if mask is None else jnp.logical_and(mask, tri)
      causal = False
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal)
  if implementation == "chunked":
    return _chunked(q, k, v, mask, causal, chunk_size, kv_chunk_size)
  return _plain(q, k, v, mask, causal)


def _plain(q, k, v, mask, causal):
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  if causal:
    q_len, kv_len = q.shape[1], k.shape[1]
    tri = jnp.tril(jnp.ones((q_len, kv_len), bool), k=kv_len - q_len)
    mask = tri if mask is None else jnp.logical_and(mask, tri)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def _blocks(x, axis, n, size):
  """Pads `axis` of x to n * size and moves the n blocks to a new leading axis."""
  pad = n * size - x.shape[axis]
  if pad:
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    x = jnp.pad(x, widths)
  x = x.reshape(x.shape[:axis] + (n, size) + x.shape[axis + 1:])
  return jnp.moveaxis(x, axis, 0)


def _chunked(q, k, v, mask, causal, chunk_size, kv_chunk_size):
  batch, q_len, heads, head_dim = q.shape
  kv_len = k.shape[1]
  out_dtype = jnp.result_type(v.dtype, v.dtype)
  scale = head_dim ** -0.5
  neg = jnp.finfo(jnp.float32).min
  # (batch, heads, length, head_dim): the layout XLA CPU runs the two matmuls fastest in.
  q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))
  qc = min(chunk_size, q_len)
  kc = min(kv_chunk_size, kv_len)
  nq, nk = -(-q_len // qc), -(-kv_len // kc)
  if mask is not None:
    mask = jnp.asarray(mask, bool)
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    mask = jnp.broadcast_to(mask, mask.shape[:2] + (q_len, kv_len))

  def logits_of(qb, kb, q_start, k_start, mb):
    """Scaled, masked float32 logits of one (query block, key block)."""
    logits = jnp.einsum("bhqd,bhkd->bhqk", qb, kb, preferred_element_type=jnp.float32) * scale
    allowed = mb
    if causal:
      q_idx = q_start + jnp.arange(qc)[:, None]
      k_idx = k_start + jnp.arange(kc)[None, :]
      tri = k_idx <= q_idx + (kv_len - q_len)
      allowed = tri if allowed is None else jnp.logical_and(allowed, tri)
    if allowed is not None:
      logits = jnp.where(allowed, logits, neg)
    return logits

  if nk == 1:
    @jax.checkpoint
    def one_query_block(args):
      qi, qb, mb = args
      logits = logits_of(qb, k, qi * qc, 0, mb)
      weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
      return jnp.einsum("bhqk,bhkd->bhqd", weights, v)
  else:
    k_blocks, v_blocks = _blocks(k, 2, nk, kc), _blocks(v, 2, nk, kc)
    k_valid = (jnp.arange(nk * kc) < kv_len).reshape(nk, kc)

    def one_query_block(args):
      qi, qb, mb = args
      m_blocks = None if mb is None else _blocks(mb, 3, nk, kc)

      @jax.checkpoint
      def step(carry, xs):
        run_max, run_sum, acc = carry
        ki, kb, vb, valid, mbk = xs
        logits = logits_of(qb, kb, qi * qc, ki * kc, mbk)
        logits = jnp.where(valid, logits, -jnp.inf)  # padding keys: weight exactly 0
        new_max = jnp.maximum(run_max, lax.stop_gradient(logits.max(-1, keepdims=True)))
        p = jnp.exp(logits - new_max)
        correction = jnp.exp(run_max - new_max)
        run_sum = run_sum * correction + p.sum(-1, keepdims=True)
        acc = acc * correction + jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), vb,
                                            preferred_element_type=jnp.float32)
        return (new_max, run_sum, acc), None

      init = (jnp.full((batch, heads, qc, 1), -jnp.inf, jnp.float32),
              jnp.zeros((batch, heads, qc, 1), jnp.float32),
              jnp.zeros((batch, heads, qc, head_dim), jnp.float32))
      (_, run_sum, acc), _ = lax.scan(step, init, (jnp.arange(nk), k_blocks, v_blocks, k_valid, m_blocks))
      return acc / run_sum

  q_blocks = _blocks(q, 2, nq, qc)
  m_blocks = None if mask is None else _blocks(mask, 2, nq, qc)
  if nq == 1:
    out = one_query_block((0, q_blocks[0], None if mask is None else m_blocks[0]))[None]
  else:
    out = lax.map(one_query_block, (jnp.arange(nq), q_blocks, m_blocks))
  out = jnp.moveaxis(out, 0, 2).reshape(batch, heads, nq * qc, head_dim)[:, :, :q_len]
  return jnp.swapaxes(out, 1, 2).astype(out_dtype)
