"""The shared layer factories: the CPU patch-matrix conv for tiny images equals XLA's conv."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tdm_jax.models import layers


def _plain_params(variables):
  return jax.tree.map(lambda a: getattr(a, "value", a), variables, is_leaf=lambda a: hasattr(a, "value"))


@pytest.mark.parametrize("size,stride,c_in,c_out,kernel,patch", [
    (2, 1, 16, 8, 3, True),     # a 3x3 conv on a 2x2 image: mostly padding
    (4, 2, 8, 8, 3, True),      # a stride-2 downsample onto 2x2
    (1, 1, 4, 6, 3, True),
    (2, 1, 16, 8, 1, True),     # a 1x1 shortcut
    (8, 1, 8, 8, 3, False),     # 64 output pixels: XLA's conv
    (4, 1, 8, 8, 3, False),
])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_conv_matches_xla_and_takes_the_patch_path_on_tiny_images(size, stride, c_in, c_out, kernel, patch, dtype):
  conv = layers.conv(c_out, "c", dtype=dtype, param_dtype=jnp.float32, kernel=kernel, stride=stride)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((3, size, size, c_in)), jnp.float32)
  variables = conv.init(jax.random.key(0), x)
  reference = nn.Conv(c_out, (kernel, kernel), strides=(stride, stride), padding=((kernel // 2, kernel // 2),) * 2,
                      dtype=dtype)
  params = _plain_params(variables)
  tol = 1e-5 if dtype == jnp.float32 else 5e-2
  np.testing.assert_allclose(np.asarray(conv.apply(variables, x), np.float32),
                             np.asarray(reference.apply(params, x), np.float32), rtol=tol, atol=tol)
  # and its gradient, which the training step takes through it
  grad = lambda m, p: jax.grad(lambda p, x: jnp.sum(m.apply(p, x).astype(jnp.float32) ** 2), argnums=(0, 1))(p, x)
  ours, theirs = grad(conv, variables), grad(reference, params)
  for a, b in zip(jax.tree.leaves(_plain_params(ours)), jax.tree.leaves(theirs)):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=10 * tol, atol=10 * tol)
  jaxpr = str(jax.make_jaxpr(lambda x: conv.apply(variables, x))(x))
  assert ("conv_general_dilated" not in jaxpr) == patch
