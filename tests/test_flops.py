"""The loop-aware FLOP count of compiled programs (tdm_jax/infra/flops.py) against XLA's and against hand counts."""

import jax
import jax.numpy as jnp
import pytest

from tdm_jax.infra import flops

W = jnp.ones((64, 64))
K = jnp.ones((3, 3, 8, 16))


def _conv(img, k):
  return jax.lax.conv_general_dilated(img, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def test_flat_program_agrees_with_xla_cost_analysis():
  loss = lambda x, img, k: jnp.sum(jnp.tanh(x @ W)) + jnp.sum(_conv(img, k) ** 2)
  compiled = jax.jit(jax.grad(loss, argnums=(0, 2))).lower(jnp.ones((32, 64)), jnp.ones((2, 8, 8, 8)), K).compile()
  got = flops.compiled_flops(compiled)
  dot, conv = 2 * 32 * 64 * 64, 2 * 2 * 8 * 8 * 16 * 9 * 8
  assert got["flops"] == pytest.approx(2 * dot + 2 * conv, rel=1e-6)  # x @ W and dx; conv forward and dk
  # XLA leaves out the taps on padding (a 3x3 "SAME" conv on 8x8 has 16% of them) and adds elementwise work
  assert got["xla_flops"] == pytest.approx(2 * dot + 2 * conv * (22 / 24) ** 2, rel=0.02)
  dots = jax.jit(jax.grad(lambda x: jnp.sum(jnp.tanh(x @ W @ W)))).lower(jnp.ones((32, 64))).compile()
  got = flops.compiled_flops(dots)
  assert got["flops"] == pytest.approx(got["xla_flops"], rel=0.01)


def test_loops_count_every_trip_and_conditionals_their_largest_branch():
  def scanned(x):
    return jax.lax.scan(lambda c, _: (jnp.tanh(c @ W), None), x, None, length=5)[0]
  compiled = jax.jit(scanned).lower(jnp.ones((32, 64))).compile()
  got = flops.compiled_flops(compiled)
  assert got["flops"] == 5 * 2 * 32 * 64 * 64
  assert got["xla_flops"] < 2 * 2 * 32 * 64 * 64  # XLA counts the body once
  assert got["unknown_trip_loops"] == 0

  branchy = lambda x, p: jax.lax.cond(p, lambda x: x @ W @ W, lambda x: x @ W, x)
  assert flops.compiled_flops(jax.jit(branchy).lower(jnp.ones((32, 64)), True).compile())["flops"] == \
      2 * 2 * 32 * 64 * 64


def test_text_without_entry_is_an_error():
  with pytest.raises(ValueError, match="ENTRY"):
    flops.count("HloModule m\n")
