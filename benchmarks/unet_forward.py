"""Our Flax UNet's forward (and forward + backward) against Diffusers' PyTorch UNet on the same weights.

Run: `python benchmarks/unet_forward.py [--unet=tiny|shapes] [--batch_size=4] [--size=32] [--repeats=20]
[--attention=xla|chunked|auto|dot_product_attention] [--backward]` (needs torch, a test dependency).
`tiny`: a small SD-style UNet (block_out_channels 32, 64; cross-attention on the first level) at
`size` x `size` latents. `shapes`: the shipped shapes teacher's SDXL-style UNet at its 8x8 latents
(`--size` ignored), the network of the shapes rows of `iteration.py`. Prints the median milliseconds
of a jitted forward of ours and of PyTorch eager (timed alternately), their ratio, our compile time,
and with `--backward` the same for the gradient of sum(output**2) with respect to the weights.
`--attention` picks our attention implementation (see `tdm_jax/models/attention.py`).
"""

import os
import statistics
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import torch  # pylint: disable=wrong-import-position
from diffusers import UNet2DConditionModel as TorchUNet  # pylint: disable=wrong-import-position
from safetensors.numpy import load_file  # pylint: disable=wrong-import-position

from tdm_jax.convert.unet import unet_params_from_state_dict  # pylint: disable=wrong-import-position
from tdm_jax.models.unet import UNet2DConditionModel, UNetConfig  # pylint: disable=wrong-import-position

_BATCH = flags.DEFINE_integer("batch_size", 4, "Batch size.")
_SIZE = flags.DEFINE_integer("size", 32, "Latent height and width.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed forwards.")
_UNET = flags.DEFINE_enum("unet", "tiny", ["tiny", "shapes"], "Which UNet (see the docstring).")
_BACKWARD = flags.DEFINE_bool("backward", False, "Also time forward + backward (weight gradients).")
_ATTENTION = flags.DEFINE_enum("attention", "xla", ["xla", "chunked", "auto", "dot_product_attention"],
                               "Attention implementation of our UNet.")

TINY = dict(sample_size=32, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=8, cross_attention_dim=32, norm_num_groups=8)


SHAPES_UNET = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "tdm_jax", "assets", "shapes", "pipeline", "unet")


def _medians_ms(fns: dict, repeats: int) -> dict:
  """Median milliseconds of each callable, timed in turn `repeats` times (alternating, so a slow spell
  of this shared machine hits every side)."""
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn()
      times[name].append(1000 * (time.perf_counter() - start))
  return {name: statistics.median(v) for name, v in times.items()}


def _networks():
  """(torch UNet, our params, config, inputs as numpy: sample, timesteps, context, added conditioning)."""
  torch.manual_seed(0)
  rng = np.random.default_rng(0)
  b = _BATCH.value
  if _UNET.value == "shapes":
    theirs = TorchUNet.from_pretrained(SHAPES_UNET)
    state = {k: v.detach().numpy() for k, v in theirs.state_dict().items()}
  else:
    theirs = TorchUNet(**TINY)
    with tempfile.TemporaryDirectory() as tmp:
      theirs.save_pretrained(tmp, safe_serialization=True)
      state = load_file(os.path.join(tmp, "diffusion_pytorch_model.safetensors"))
  cfg = dict(theirs.config)
  config = UNetConfig.from_dict(cfg)
  params = jax.device_put(unet_params_from_state_dict(state, config))
  size = cfg["sample_size"] if _UNET.value == "shapes" else _SIZE.value
  x = rng.standard_normal((b, cfg["in_channels"], size, size)).astype(np.float32)
  t = np.full((b,), 500)
  ctx = rng.standard_normal((b, 77, cfg["cross_attention_dim"])).astype(np.float32)
  added = None
  if cfg.get("addition_embed_type") == "text_time":
    width = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
    added = {"text_embeds": rng.standard_normal((b, width)).astype(np.float32),
             "time_ids": np.tile(np.array([8.0 * size, 8.0 * size, 0, 0, 8.0 * size, 8.0 * size], np.float32), (b, 1))}
  return theirs, params, config, (x, t, ctx, added)


def main(_):
  torch.set_num_threads(os.cpu_count() or 1)
  theirs, params, config, (x, t, ctx, added) = _networks()
  model = UNet2DConditionModel(config, attention_implementation=_ATTENTION.value)
  apply = lambda p, x: model.apply({"params": p}, x, t, ctx, added)
  forward = jax.jit(apply)
  grad = jax.jit(jax.grad(lambda p, x: jnp.sum(apply(p, x) ** 2)))
  start = time.perf_counter()
  jax.block_until_ready(forward(params, x))
  compile_s = time.perf_counter() - start
  tx, tt, tc = torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx)
  tadded = None if added is None else {k: torch.from_numpy(v) for k, v in added.items()}
  run_theirs = lambda: theirs(tx, tt, tc, added_cond_kwargs=tadded).sample

  def theirs_forward():
    with torch.no_grad():
      return run_theirs()

  def theirs_backward():
    theirs.zero_grad(set_to_none=True)
    (run_theirs() ** 2).sum().backward()

  fns = {"ours forward": lambda: jax.block_until_ready(forward(params, x)), "theirs forward": theirs_forward}
  if _BACKWARD.value:
    jax.block_until_ready(grad(params, x))
    fns.update({"ours backward": lambda: jax.block_until_ready(grad(params, x)), "theirs backward": theirs_backward})
  for fn in fns.values():
    fn()  # warm-up
  ms = _medians_ms(fns, _REPEATS.value)
  print(f"devices: {jax.devices()[0].platform}, UNet {_UNET.value}, batch {_BATCH.value}, latents "
        f"{x.shape[2]}x{x.shape[3]}, torch threads {torch.get_num_threads()}, attention {_ATTENTION.value}")
  print(f"ours (jit): forward {ms['ours forward']:.1f} ms; first call incl. compile {compile_s:.1f} s")
  print(f"diffusers (torch eager): forward {ms['theirs forward']:.1f} ms")
  print(f"ratio ours / torch, forward: {ms['ours forward'] / ms['theirs forward']:.2f}")
  if _BACKWARD.value:
    print(f"forward + backward: ours {ms['ours backward']:.1f} ms, diffusers {ms['theirs backward']:.1f} ms, "
          f"ratio {ms['ours backward'] / ms['theirs backward']:.2f}")


if __name__ == "__main__":
  app.run(main)
