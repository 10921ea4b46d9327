"""Every attention implementation equals the plain ("xla") path, values and gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tdm_jax.models.attention import IMPLEMENTATIONS, attention

# Small blocks so that the short test sequences span several query and key blocks, with remainders.
_KW = dict(chunk_size=16, kv_chunk_size=24, min_fused_length=8)


def _inputs(q_len, kv_len, batch=2, heads=3, head_dim=8, seed=0):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((batch, q_len, heads, head_dim)).astype(np.float32)
  k = rng.standard_normal((batch, kv_len, heads, head_dim)).astype(np.float32)
  v = rng.standard_normal((batch, kv_len, heads, head_dim)).astype(np.float32)
  return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)


def _close(got, want):
  scale = float(jnp.max(jnp.abs(want)))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5 * max(scale, 1.0))


CASES = {
    "self": (37, 37, None, False),
    "cross": (37, 77, None, False),
    "self_causal": (45, 45, None, True),
    "cross_causal": (29, 53, None, True),
    "mask": (37, 53, "bk", False),
    "mask_full": (37, 53, "bhqk", False),
    "mask_causal": (45, 45, "q k", True),
    "single_block": (5, 7, "bk", True),
}


def _mask(kind, q_len, kv_len, batch=2, heads=3):
  if kind is None:
    return None
  rng = np.random.default_rng(1)
  shape = {"bk": (batch, 1, 1, kv_len), "bhqk": (batch, heads, q_len, kv_len), "q k": (q_len, kv_len)}[kind]
  mask = rng.random(shape) > 0.3
  if kind == "bhqk":
    mask[0, 0, 3] = False  # a fully masked query row: uniform weights, as in the plain path
  return jnp.asarray(mask)


# "auto" on CPU is "chunked" (above min_fused_length) or "xla": two cases suffice for it.
_FORWARD = ([("chunked", c) for c in sorted(CASES)] + [("dot_product_attention", c) for c in sorted(CASES)]
            + [("auto", "mask_causal"), ("auto", "single_block")])


@pytest.mark.parametrize("implementation,case", _FORWARD)
def test_equals_plain(implementation, case):
  q_len, kv_len, mask_kind, causal = CASES[case]
  q, k, v = _inputs(q_len, kv_len)
  mask = _mask(mask_kind, q_len, kv_len)
  fn = functools.partial(attention, mask=mask, causal=causal, **_KW)
  want = jax.jit(functools.partial(fn, implementation="xla"))(q, k, v)
  got = jax.jit(functools.partial(fn, implementation=implementation))(q, k, v)
  assert got.shape == want.shape and got.dtype == want.dtype
  _close(got, want)


@pytest.mark.parametrize("implementation,case", [("chunked", "mask_full"), ("chunked", "cross_causal"),
                                                  ("dot_product_attention", "mask_causal")])
def test_gradients_equal_plain(implementation, case):
  q_len, kv_len, mask_kind, causal = CASES[case]
  q, k, v = _inputs(q_len, kv_len)
  mask = _mask(mask_kind, q_len, kv_len)
  w = jnp.asarray(np.random.default_rng(2).standard_normal(q.shape[:2] + v.shape[2:]).astype(np.float32))

  def loss(impl, q, k, v):
    return jnp.sum(w * attention(q, k, v, mask=mask, causal=causal, implementation=impl, **_KW))

  want = jax.jit(jax.grad(functools.partial(loss, "xla"), argnums=(0, 1, 2)))(q, k, v)
  got = jax.jit(jax.grad(functools.partial(loss, implementation), argnums=(0, 1, 2)))(q, k, v)
  for g, wg in zip(got, want):
    assert bool(jnp.all(jnp.isfinite(g)))
    _close(g, wg)


def test_chunked_default_blocks_long_sequence():
  """The default block sizes on a UNet-like shape: several query blocks, one key block."""
  q, k, v = _inputs(600, 600, batch=1, heads=2, head_dim=4)
  want = attention(q, k, v, implementation="xla")
  _close(jax.jit(functools.partial(attention, implementation="chunked"))(q, k, v), want)


def test_bfloat16_output_dtype():
  q, k, v = (a.astype(jnp.bfloat16) for a in _inputs(37, 53))
  for impl in ("chunked", "dot_product_attention"):
    out = jax.jit(functools.partial(attention, implementation=impl, **_KW))(q, k, v)
    assert out.dtype == jnp.bfloat16
    want = attention(q, k, v, implementation="xla")
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want, np.float32), atol=3e-2)


def test_unknown_implementation():
  q, k, v = _inputs(4, 4)
  with pytest.raises(ValueError) as err:
    attention(q, k, v, implementation="flash")
  for name in IMPLEMENTATIONS:
    assert name in str(err.value)
