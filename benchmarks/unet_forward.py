"""Our Flax UNet's forward against Diffusers' PyTorch UNet on the same weights, on this machine.

Run: `python benchmarks/unet_forward.py [--batch_size=4] [--size=32] [--repeats=20]
[--attention=xla|chunked|auto|dot_product_attention]` (needs torch, a test dependency). A small SD-style UNet (block_out_channels 32, 64; cross-attention on the first
level) at `size` x `size` latents; prints the median milliseconds of a jitted forward of ours, of
PyTorch eager, their ratio, and our compile time. `--attention` picks our attention implementation
(see `tdm_jax/models/attention.py`).
"""

import os
import statistics
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import torch  # pylint: disable=wrong-import-position
from diffusers import UNet2DConditionModel as TorchUNet  # pylint: disable=wrong-import-position
from safetensors.numpy import load_file  # pylint: disable=wrong-import-position

from tdm_jax.convert.unet import unet_params_from_state_dict  # pylint: disable=wrong-import-position
from tdm_jax.models.unet import UNet2DConditionModel, UNetConfig  # pylint: disable=wrong-import-position

_BATCH = flags.DEFINE_integer("batch_size", 4, "Batch size.")
_SIZE = flags.DEFINE_integer("size", 32, "Latent height and width.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed forwards.")
_ATTENTION = flags.DEFINE_enum("attention", "xla", ["xla", "chunked", "auto", "dot_product_attention"],
                               "Attention implementation of our UNet.")

TINY = dict(sample_size=32, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=8, cross_attention_dim=32, norm_num_groups=8)


def _median_ms(fn, repeats):
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(1000 * (time.perf_counter() - start))
  return statistics.median(times)


def main(_):
  torch.manual_seed(0)
  theirs = TorchUNet(**TINY).eval()
  with tempfile.TemporaryDirectory() as tmp:
    theirs.save_pretrained(tmp, safe_serialization=True)
    state = load_file(os.path.join(tmp, "diffusion_pytorch_model.safetensors"))
  config = UNetConfig.from_dict(dict(theirs.config))
  params = unet_params_from_state_dict(state, config)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((_BATCH.value, 4, _SIZE.value, _SIZE.value)).astype(np.float32)
  t = np.full((_BATCH.value,), 500)
  ctx = rng.standard_normal((_BATCH.value, 77, 32)).astype(np.float32)

  forward = jax.jit(UNet2DConditionModel(config, attention_implementation=_ATTENTION.value).apply)
  start = time.perf_counter()
  jax.block_until_ready(forward({"params": params}, x, t, ctx))
  compile_s = time.perf_counter() - start
  ours_ms = _median_ms(lambda: jax.block_until_ready(forward({"params": params}, x, t, ctx)), _REPEATS.value)
  tx, tt, tc = torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx)
  with torch.no_grad():
    theirs(tx, tt, tc)
    torch_ms = _median_ms(lambda: theirs(tx, tt, tc), _REPEATS.value)
  print(f"devices: {jax.devices()[0].platform}, batch {_BATCH.value}, latents {_SIZE.value}x{_SIZE.value}, "
        f"torch threads {torch.get_num_threads()}, attention {_ATTENTION.value}")
  print(f"ours (jit): {ours_ms:.1f} ms; first call incl. compile {compile_s:.1f} s")
  print(f"diffusers (torch eager): {torch_ms:.1f} ms")
  print(f"ratio ours / torch: {ours_ms / torch_ms:.2f}")


if __name__ == "__main__":
  app.run(main)
