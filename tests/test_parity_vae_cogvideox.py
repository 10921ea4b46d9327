"""Our Flax CogVideoX VAE equals diffusers.AutoencoderKLCogVideoX on the same (tiny, random) weights.

Shapes are chosen so that eager calls reuse compiled frame-batch steps: the 9-frame, 16x24 video is the
first frame batch of the 17-frame one and the full tile of the tiled tests.
"""

import functools
import json
import os

import flax
import jax
import numpy as np
import pytest

import diffusers
import safetensors.numpy as safetensors_numpy
import torch

from tdm_jax.convert import vae_cogvideox as convert
from tdm_jax.convert.errors import ConversionError
from tdm_jax.infra.errors import ConfigError
from tdm_jax.models import vae_cogvideox as cogvae

# Four blocks as the published VAE: blocks 0 and 1 halve time (log2 of the ratio 4), block 2 only space,
# block 3 has no sampler; 8 -> 16 channels exercises the resnet conv shortcut.
TINY = dict(
    in_channels=3, out_channels=3, down_block_types=["CogVideoXDownBlock3D"] * 4,
    up_block_types=["CogVideoXUpBlock3D"] * 4, block_out_channels=[8, 16, 16, 16], latent_channels=4,
    layers_per_block=1, norm_num_groups=4, temporal_compression_ratio=4, sample_height=32, sample_width=48,
)
# THUDM/CogVideoX-2b vae/config.json (the 5b's VAE is the same network).
PUBLISHED_2B = {
    "_class_name": "AutoencoderKLCogVideoX", "_diffusers_version": "0.42.1", "act_fn": "silu",
    "block_out_channels": [128, 256, 256, 512], "down_block_types": ["CogVideoXDownBlock3D"] * 4,
    "force_upcast": True, "in_channels": 3, "invert_scale_latents": False, "latent_channels": 16,
    "latents_mean": None, "latents_std": None, "layers_per_block": 3, "norm_eps": 1e-06, "norm_num_groups": 32,
    "out_channels": 3, "sample_height": 480, "sample_width": 720, "scaling_factor": 1.15258426,
    "shift_factor": None, "temporal_compression_ratio": 4, "up_block_types": ["CogVideoXUpBlock3D"] * 4,
    "use_post_quant_conv": False, "use_quant_conv": False,
}
# Small tiles (the 16x24 video's size) with overlaps that blend at least one latent row and column.
TILE = dict(tile_sample_min_height=16, tile_sample_min_width=24, tile_overlap_factor_height=1 / 2,
            tile_overlap_factor_width=1 / 3)
TILING = cogvae.Tiling(16, 24, 1 / 2, 1 / 3)


def _close(ours, theirs, name):
  ours, theirs = np.asarray(ours), np.asarray(theirs)
  assert ours.shape == theirs.shape, (name, ours.shape, theirs.shape)
  err = float(np.max(np.abs(ours - theirs)))
  tol = 1e-4 * max(1.0, float(np.max(np.abs(theirs))))
  print(f"{name}: max|ours - theirs| = {err:.3e} (tol {tol:.1e})")
  assert err <= tol, (name, err, tol)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(torch vae, saved config.json dict, safetensors as numpy, our params, our config)."""
  folder = tmp_path_factory.mktemp("cogvideox_vae")
  torch.manual_seed(0)
  vae = diffusers.AutoencoderKLCogVideoX(**TINY).eval()
  with torch.no_grad():  # non-trivial norms and biases, so a swapped scale / bias would show
    for name, p in vae.named_parameters():
      if name.endswith("bias") or "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  vae.save_pretrained(folder, safe_serialization=True)
  with open(os.path.join(folder, "config.json")) as f:
    config = json.load(f)
  state = safetensors_numpy.load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
  cfg = cogvae.CogVideoXVAEConfig.from_dict(config)
  return vae, config, state, convert.params_from_state_dict(state, config), cfg


def _torch_encode(vae, x):
  with torch.no_grad():
    dist = vae.encode(torch.from_numpy(x)).latent_dist
  return dist.mean.numpy(), dist.logvar.numpy()


def _torch_decode(vae, z):
  with torch.no_grad():
    return vae.decode(torch.from_numpy(z)).sample.numpy()


def _video(seed, shape):
  return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


def _latents(seed, shape):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_encode_parity_with_frame_batches(tiny):
  """9 frames (one of Diffusers' frame batches), 5 frames at batch 2, and 17 frames: batches of 9 and 8 with
  the conv cache carried; the whole `encode` also under one jit."""
  vae, _, _, params, cfg = tiny
  x17 = _video(0, (1, 3, 17, 16, 24))
  for name, x in (("9 frames", x17[:, :, :9]), ("5 frames, batch 2", _video(1, (2, 3, 5, 16, 24))),
                  ("17 frames", x17)):
    t_mean, t_logvar = _torch_encode(vae, x)
    mean, logvar = cogvae.encode(params, x, cfg)
    assert mean.shape == (x.shape[0], 4, 1 + (x.shape[2] - 1) // 4, 2, 3)
    _close(mean, t_mean, f"encode {name} mean")
    _close(logvar, t_logvar, f"encode {name} logvar")
  jitted = jax.jit(functools.partial(cogvae.encode, config=cfg))(params, x17)
  np.testing.assert_allclose(jitted[0], mean, atol=1e-5)


def test_decode_parity_with_frame_batches(tiny):
  """3 latent frames (one batch), 2 at batch 2, and 5: Diffusers' latent batches (0-2) and (3-4) with the cache."""
  vae, _, _, params, cfg = tiny
  z5 = _latents(2, (1, 4, 5, 2, 3))
  for name, z, frames in (("3 latent frames", z5[:, :, :3], 9), ("2 latent frames, batch 2",
                                                                   _latents(3, (2, 4, 2, 2, 3)), 8),
                          ("5 latent frames", z5, 17)):
    video = cogvae.decode(params, z, cfg)
    assert video.shape == (z.shape[0], 3, frames, 16, 24)
    _close(video, _torch_decode(vae, z), f"decode {name}")
  # The batching changes the result (GroupNorm statistics per batch): the test above is sensitive to it.
  vae.num_latent_frames_batch_size = 5
  try:
    one_batch = _torch_decode(vae, z5)
  finally:
    vae.num_latent_frames_batch_size = cogvae.LATENT_FRAMES_BATCH
  assert np.max(np.abs(one_batch - np.asarray(video))) > 1e-3


def test_tiled_encode_decode_parity(tiny):
  """A 24x40 video in 16x24 tiles: a 3x3 grid of tiles, partial ones at the bottom and right, each blended
  with the (already blended) tiles above and left of it, as Diffusers does. (Tiles in several frame batches,
  a `lax.map` over a `lax.scan`, are the same code as the frame-batch tests; left out for time.)"""
  vae, _, _, params, cfg = tiny
  x = _video(4, (1, 3, 9, 24, 40))
  z = _latents(5, (1, 4, 3, 3, 5))
  plain_mean, _ = _torch_encode(vae, x)
  vae.enable_tiling(**TILE)
  try:
    t_mean, t_logvar = _torch_encode(vae, x)
    t_video = _torch_decode(vae, z)
  finally:
    vae.disable_tiling()
  assert np.max(np.abs(plain_mean - t_mean)) > 1e-3  # tiling took effect
  mean, logvar = cogvae.encode(params, x, cfg, use_tiling=True, tiling=TILING)
  assert mean.shape == (1, 4, 3, 3, 5)
  _close(mean, t_mean, "tiled encode mean")
  _close(logvar, t_logvar, "tiled encode logvar")
  video = cogvae.decode(params, z, cfg, use_tiling=True, tiling=TILING)
  assert video.shape == (1, 3, 9, 24, 40)
  _close(video, t_video, "tiled decode")


def test_converter_round_trip_and_logical_axes(tiny):
  _, config, state, params, cfg = tiny
  back = convert.state_dict_from_params(params, config)
  assert set(back) == set(state)
  for k in state:
    np.testing.assert_array_equal(back[k], state[k], err_msg=k)
  abstract = convert.abstract_params(cfg)
  leaves = jax.tree_util.tree_leaves(abstract, is_leaf=lambda l: hasattr(l, "names"))
  assert leaves and all(hasattr(l, "names") and len(l.names) == l.value.ndim for l in leaves)
  assert abstract["encoder"]["conv_in"]["conv"]["kernel"].names[0] == "conv_time"
  # A tree that is not the config's is refused before export.
  flat = flax.traverse_util.flatten_dict(params)
  path = ("decoder", "conv_out", "conv", "kernel")
  with pytest.raises(ConversionError, match="decoder/conv_out/conv/kernel: expected"):
    convert.state_dict_from_params(flax.traverse_util.unflatten_dict({**flat, path: np.zeros((3,))}), cfg)


def test_refusals_name_what_is_wrong(tiny):
  _, config, state, _, _ = tiny
  with pytest.raises(ConfigError, match="unknown key.*spatial_compression_ratio"):
    cogvae.CogVideoXVAEConfig.from_dict(dict(config, spatial_compression_ratio=8))
  with pytest.raises(ConfigError, match="use_quant_conv"):
    cogvae.CogVideoXVAEConfig.from_dict(dict(config, use_quant_conv=True))
  with pytest.raises(ConfigError, match="DownEncoderBlock2D"):
    cogvae.CogVideoXVAEConfig.from_dict(dict(config, down_block_types=["DownEncoderBlock2D"] * 4))
  bad = dict(state)
  del bad["decoder.up_blocks.0.resnets.1.norm2.conv_y.conv.bias"]
  bad["encoder.extra.weight"] = np.zeros((3,), np.float32)
  bad["encoder.conv_in.conv.weight"] = np.zeros((8, 3, 1, 3, 3), np.float32)
  with pytest.raises(ConversionError) as err:
    convert.params_from_state_dict(bad, config)
  msg = str(err.value)
  assert "decoder.up_blocks.0.resnets.1.norm2.conv_y.conv.bias" in msg
  assert "encoder.extra.weight" in msg
  assert "encoder.conv_in.conv.weight: expected (8, 3, 3, 3, 3), got (8, 3, 1, 3, 3)" in msg


def test_published_2b_config_parameter_count():
  cfg = cogvae.CogVideoXVAEConfig.from_dict(PUBLISHED_2B)
  sizes = [int(np.prod(s)) for s in convert.expected_param_shapes(cfg).values()]
  assert sum(sizes) == 215_583_907 and len(sizes) == 436
