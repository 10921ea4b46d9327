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


# "splash" (the Pallas TPU kernel) in Pallas interpret mode, on CPU. Interpret mode is slow: tiny shapes,
# 128-long blocks (the smallest the kernel takes), head_dim 24 (zero-padded to 128 as PixArt's 72 is).
_SPLASH = dict(implementation="splash", interpret=True, min_fused_length=8, splash_block_q=128,
               splash_block_kv=128)


def _key_padding_mask(kept, kv_len):
  """(batch, 1, 1, kv_len): row b keeps its first kept[b] keys and key kv_len - 1 when kept[b] > 0."""
  mask = np.arange(kv_len)[None] < np.asarray(kept)[:, None]
  mask[:, -1] |= np.asarray(kept) > 0
  return jnp.asarray(mask[:, None, None, :])


# q_len, kv_len, batch, kept keys per sample (None: no mask), causal. Lengths are not block multiples.
SPLASH_CASES = {
    "self": (200, 200, 2, None, False),  # 2 x 2 blocks of 128, padded to 256
    "cross_mask": (150, 77, 3, (77, 13, 0), False),  # one sample keeps no key: uniform, as the plain path
    "self_causal": (150, 150, 1, None, True),
    "cross_causal": (100, 150, 1, None, True),  # bottom-right aligned on the real lengths
}


@pytest.mark.parametrize("case", sorted(SPLASH_CASES))
def test_splash_interpret_equals_plain(case):
  q_len, kv_len, batch, kept, causal = SPLASH_CASES[case]
  q, k, v = _inputs(q_len, kv_len, batch=batch, heads=2, head_dim=24)
  mask = None if kept is None else _key_padding_mask(kept, kv_len)
  want = attention(q, k, v, mask=mask, causal=causal, implementation="xla")
  got = jax.jit(functools.partial(attention, mask=mask, causal=causal, **_SPLASH))(q, k, v)
  assert got.shape == want.shape and got.dtype == want.dtype
  _close(got, want)


def _splash_grads(q, k, v, mask, causal, impl_kw):
  w = jnp.asarray(np.random.default_rng(2).standard_normal(q.shape[:2] + v.shape[2:]).astype(np.float32))

  def loss(q, k, v):
    return jnp.sum(w * attention(q, k, v, mask=mask, causal=causal, **impl_kw))

  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


def test_splash_interpret_gradients_equal_plain():
  """The kernel's own VJP (dq and dkv kernels) through the padding and the key-padding mask."""
  q, k, v = _inputs(150, 140, batch=3, heads=2, head_dim=24)
  mask = _key_padding_mask((140, 30, 0), 140)
  want = _splash_grads(q, k, v, mask, False, dict(implementation="xla"))
  got = _splash_grads(q, k, v, mask, False, _SPLASH)
  for g, wg in zip(got, want):
    assert bool(jnp.all(jnp.isfinite(g)))
    _close(g, wg)


def test_splash_interpret_sharded_over_mesh():
  """Under a (data, fsdp, tensor) mesh the kernel runs in shard_map: batch over data and fsdp, heads over
  tensor; values and gradients as on one device."""
  if len(jax.devices()) < 8:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
  q, k, v = _inputs(130, 130, batch=4, heads=2, head_dim=24)
  mask = _key_padding_mask((130, 60, 1, 0), 130)
  want_out = attention(q, k, v, mask=mask, implementation="xla")
  want_grads = _splash_grads(q, k, v, mask, False, dict(implementation="xla"))
  with jax.set_mesh(mesh):
    q, k, v = (jax.device_put(a, NamedSharding(mesh, P(("data", "fsdp")))) for a in (q, k, v))
    fn = jax.jit(functools.partial(attention, mask=mask, **_SPLASH))
    assert "manual_computation" in fn.lower(q, k, v).as_text()  # the shard_map
    got_out = fn(q, k, v)
    got_grads = _splash_grads(q, k, v, mask, False, _SPLASH)
  _close(got_out, want_out)
  for g, wg in zip(got_grads, want_grads):
    _close(g, wg)


def _uses_pallas(fn, *args):
  return "pallas_call" in str(jax.make_jaxpr(fn)(*args))


def test_splash_fallbacks_and_auto_on_tpu(monkeypatch):
  """What the kernel cannot express takes the plain path; "auto" on a TPU picks "splash" (traced only)."""
  q, k, v = _inputs(37, 53, heads=3, head_dim=8)
  for mask_kind, causal in (("bhqk", False), ("q k", False), ("bk", True)):
    mask = _mask(mask_kind, 37, 53)
    fn = functools.partial(attention, mask=mask, causal=causal, **_SPLASH)
    assert not _uses_pallas(fn, q, k, v)
    _close(fn(q, k, v), attention(q, k, v, mask=mask, causal=causal, implementation="xla"))
  kw = dict(_SPLASH, min_fused_length=64)
  assert not _uses_pallas(functools.partial(attention, **kw), q, k, v)  # shorter than min_fused_length
  assert not _uses_pallas(functools.partial(attention, causal=True, **_SPLASH), *_inputs(53, 37))
  assert _uses_pallas(functools.partial(attention, mask=_mask("bk", 37, 53), **_SPLASH), q, k, v)

  class FakeTpu:
    platform = "tpu"
  monkeypatch.setattr(jax, "devices", lambda *a: [FakeTpu()])
  auto = dict(_SPLASH, implementation="auto")
  assert _uses_pallas(functools.partial(attention, **auto), q, k, v)
  assert not _uses_pallas(functools.partial(attention, **dict(auto, min_fused_length=64)), q, k, v)


def test_splash_bfloat16_and_block_size_check():
  q, k, v = (a.astype(jnp.bfloat16) for a in _inputs(130, 130, batch=1, heads=2, head_dim=24))
  out = jax.jit(functools.partial(attention, **_SPLASH))(q, k, v)
  assert out.dtype == jnp.bfloat16
  want = attention(q, k, v, implementation="xla")
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want, np.float32), atol=3e-2)
  with pytest.raises(ValueError, match="multiple of 128"):
    attention(q, k, v, **dict(_SPLASH, splash_block_q=100))
