"""One 3x3 conv at the shapes UNet's sizes: XLA's conv, our patch-matrix conv and PyTorch's, on CPU.

Run: `python benchmarks/conv_ops.py [--repeats=30]` (needs torch). For each (batch, image, c_in ->
c_out, stride) row prints the median milliseconds of the forward and of the gradient with respect
to input and kernel, for XLA's `lax.conv_general_dilated`, for `models/layers._patch_conv` (the
path `models/layers.py` takes on CPU for outputs of <= PATCH_CONV_MAX_PIXELS pixels) and for
PyTorch eager's conv2d: the measurement behind that threshold.
"""

import os
import statistics
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import torch  # pylint: disable=wrong-import-position

from tdm_jax.models import layers  # pylint: disable=wrong-import-position

_REPEATS = flags.DEFINE_integer("repeats", 30, "Timed calls per figure (median).")

# (batch, image side, c_in, c_out, stride): the shapes UNet's 3x3 convs at batch 32, and a small batch.
ROWS = [(32, 8, 32, 32, 1), (32, 8, 96, 64, 1), (32, 8, 32, 32, 2), (32, 4, 64, 64, 1), (32, 4, 128, 64, 1),
        (32, 4, 64, 64, 2), (32, 2, 64, 64, 1), (32, 2, 128, 64, 1), (2, 2, 64, 64, 1)]


def _median_ms(fn, repeats):
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(1000 * (time.perf_counter() - start))
  return statistics.median(times)


def main(_):
  torch.set_num_threads(os.cpu_count() or 1)
  n = _REPEATS.value
  xla = lambda x, w, s: jax.lax.conv_general_dilated(x, w, (s, s), ((1, 1), (1, 1)),
                                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
  patch = lambda x, w, s: layers._patch_conv(x, w, (s, s), ((1, 1), (1, 1)), None)  # pylint: disable=protected-access
  print("| batch, image, channels, stride | output pixels | XLA fwd / grad ms | patch fwd / grad ms | "
        "PyTorch fwd / grad ms |")
  print("|---|---|---|---|---|")
  rng = np.random.default_rng(0)
  for b, side, c_in, c_out, stride in ROWS:
    x = rng.standard_normal((b, side, side, c_in)).astype(np.float32)
    w = rng.standard_normal((3, 3, c_in, c_out)).astype(np.float32)
    xj, wj = jax.device_put(x), jax.device_put(w)
    cells = []
    for conv in (xla, patch):
      fwd = jax.jit(lambda x, w, conv=conv: conv(x, w, stride))
      grad = jax.jit(jax.grad(lambda x, w, conv=conv: jnp.sum(conv(x, w, stride) ** 2), argnums=(0, 1)))
      cells.append(f"{_median_ms(lambda: fwd(xj, wj).block_until_ready(), n):.3f} / "
                   f"{_median_ms(lambda: jax.block_until_ready(grad(xj, wj)), n):.3f}")
    np.testing.assert_allclose(patch(xj, wj, stride), xla(xj, wj, stride), rtol=1e-4, atol=1e-3)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
    wt = torch.from_numpy(w.transpose(3, 2, 0, 1).copy()).requires_grad_(True)

    def torch_forward():
      with torch.no_grad():
        return torch.nn.functional.conv2d(xt, wt, stride=stride, padding=1)

    def torch_grad():
      xt.grad = wt.grad = None
      (torch.nn.functional.conv2d(xt, wt, stride=stride, padding=1) ** 2).sum().backward()

    cells.append(f"{_median_ms(torch_forward, n):.3f} / {_median_ms(torch_grad, n):.3f}")
    pixels = ((side + 2 - 3) // stride + 1) ** 2
    print(f"| {b}, {side}x{side}, {c_in} -> {c_out}, {stride} | {pixels} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  app.run(main)
