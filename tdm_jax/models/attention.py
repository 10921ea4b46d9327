"""Scaled dot-product attention behind one function, with a choice of implementation.

"xla": plain einsum + softmax (softmax in float32), runs everywhere and is what parity tests use.
"dot_product_attention": `jax.nn.dot_product_attention` (cuDNN flash attention on GPUs when the
shapes and dtypes allow, XLA otherwise). Sequences shorter than `min_fused_length` take the plain
path, where a fused kernel gains nothing.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "dot_product_attention")


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: Optional[jax.Array] = None,
              causal: bool = False, implementation: str = "xla", min_fused_length: int = 256) -> jax.Array:
  """Multi-head attention over (batch, length, heads, head_dim) inputs.

  mask: boolean, broadcastable to (batch, heads, q_length, kv_length); True means attend.
  Returns (batch, q_length, heads, head_dim) in q's dtype.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {implementation!r} is not one of {IMPLEMENTATIONS}")
  if implementation == "dot_product_attention" and q.shape[1] >= min_fused_length:
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal)
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
