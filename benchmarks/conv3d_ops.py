"""One 3x3x3 video conv on CPU: XLA's 3-D convolution against `models/layers._time_split_conv` (a sum of 2-D
convs over the kernel's time taps, the path models/layers.py takes on CPU).

  python benchmarks/conv3d_ops.py [--repeats=5]

For each (batch, padded frames, side, c_in -> c_out) row (the embedded video teacher's VAE sizes) prints the
mean milliseconds of the forward and of the gradient with respect to input and kernel, after checking the
two agree.
"""

import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from tdm_jax.models import layers  # pylint: disable=wrong-import-position

_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per figure (mean).")
ROWS = [(8, 11, 32, 16, 16), (8, 7, 16, 32, 32), (8, 5, 8, 32, 32)]
PADDING = ((0, 0), (1, 1), (1, 1))  # time padded by the caller (causally), space symmetric


def xla_conv3d(x, k):
  return jax.lax.conv_general_dilated(x, k, (1, 1, 1), PADDING, dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))


def split_conv3d(x, k):
  return layers._time_split_conv(x, k, PADDING, None)  # pylint: disable=protected-access


def _mean_ms(fn, *args) -> float:
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(_REPEATS.value):
    jax.block_until_ready(fn(*args))
  return (time.perf_counter() - start) / _REPEATS.value * 1e3


def main(_):
  rng = np.random.default_rng(0)
  for b, t, side, c_in, c_out in ROWS:
    x = rng.standard_normal((b, t, side, side, c_in)).astype(np.float32)
    k = (rng.standard_normal((3, 3, 3, c_in, c_out)) * 0.1).astype(np.float32)
    np.testing.assert_allclose(jax.jit(split_conv3d)(x, k), jax.jit(xla_conv3d)(x, k), rtol=1e-3, atol=1e-3)
    for name, f in (("xla 3-D", xla_conv3d), ("2-D per time tap", split_conv3d)):
      grad = jax.jit(jax.grad(lambda x, k, f=f: (f(x, k) ** 2).sum(), argnums=(0, 1)))
      print(f"batch {b}, {t} frames of {side}x{side}, {c_in} -> {c_out}, {name}: forward "
            f"{_mean_ms(jax.jit(f), x, k):.1f} ms, gradient {_mean_ms(grad, x, k):.1f} ms")


if __name__ == "__main__":
  app.run(main)
