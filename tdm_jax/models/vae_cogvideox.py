"""CogVideoX's 3-D causal VAE in Flax linen, equal to `diffusers.AutoencoderKLCogVideoX`.

The public functions `encode` / `decode` are pure over the parameter tree (jit them whole, or call them
eagerly: each frame batch then runs as one cached compiled step) and take Diffusers' layout:
video (B, C, F, H, W) in [-1, 1], latents (B, C_lat, F_lat, H / 8, W / 8) with F_lat = 1 + (F - 1) / 4 for
the published config. No scaling factor is applied here: the caller multiplies, as Diffusers' pipeline does.
Inside, activations are channels-last (B, F, H, W, C).

Why the frame batching is part of the model: Diffusers encodes 8 frames (decodes 2 latent frames) at a time,
carrying each causal conv's last input frames to the next batch (the "conv cache"). GroupNorm statistics are
then per batch and the time down/up sampling treats each batch's odd first frame apart, so the result depends
on the batching; to equal Diffusers (and to decode a 49-frame clip in bounded memory) we batch the same way.

Module names mirror Diffusers' parameter names (`down_blocks.0.resnets.1` -> `down_blocks_0/resnets_1`);
conversion is in `tdm_jax/convert/vae_cogvideox.py`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Dict, List, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tdm_jax.infra.errors import ConfigError
from tdm_jax.models import layers

DOWN_BLOCK = "CogVideoXDownBlock3D"
UP_BLOCK = "CogVideoXUpBlock3D"
SUPPORTED_ACTS = ("silu", "swish")  # the same function under two names
FIXED_EPS = 1e-6  # Diffusers' encoder norm_out and every SpatialNorm3D ignore `norm_eps`
SAMPLE_FRAMES_BATCH = 8  # Diffusers' num_sample_frames_batch_size
LATENT_FRAMES_BATCH = 2  # Diffusers' num_latent_frames_batch_size
Cache = Dict[str, Any]


@dataclasses.dataclass(frozen=True)
class CogVideoXVAEConfig:
  """The fields of a Diffusers AutoencoderKLCogVideoX `config.json` (defaults: CogVideoX-2b's)."""

  in_channels: int = 3
  out_channels: int = 3
  down_block_types: Tuple[str, ...] = (DOWN_BLOCK,) * 4
  up_block_types: Tuple[str, ...] = (UP_BLOCK,) * 4
  block_out_channels: Tuple[int, ...] = (128, 256, 256, 512)
  latent_channels: int = 16
  layers_per_block: int = 3
  act_fn: str = "silu"
  norm_eps: float = 1e-6
  norm_num_groups: int = 32
  temporal_compression_ratio: float = 4
  sample_height: int = 480
  sample_width: int = 720
  scaling_factor: float = 1.15258426
  shift_factor: Optional[float] = None
  latents_mean: Optional[Tuple[float, ...]] = None
  latents_std: Optional[Tuple[float, ...]] = None
  force_upcast: bool = True
  use_quant_conv: bool = False
  use_post_quant_conv: bool = False
  invert_scale_latents: bool = False

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "CogVideoXVAEConfig":
    """From a Diffusers vae config dict. Keys starting with "_" are metadata; any other unknown key is refused,
    since a field we do not model could change the network."""
    if d.get("_class_name", "AutoencoderKLCogVideoX") != "AutoencoderKLCogVideoX":
      raise ConfigError(f"CogVideoX VAE config: _class_name {d['_class_name']!r} is not AutoencoderKLCogVideoX")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in d if k not in names and not k.startswith("_"))
    if unknown:
      raise ConfigError(f"CogVideoX VAE config: unknown key(s) {unknown}; modelled keys: {sorted(names)}")
    kwargs = {k: v for k, v in d.items() if k in names}
    for key in ("down_block_types", "up_block_types", "block_out_channels", "latents_mean", "latents_std"):
      if kwargs.get(key) is not None:
        kwargs[key] = tuple(kwargs[key])
    config = cls(**kwargs)
    config.validate()
    return config

  def validate(self) -> None:
    bad = sorted({t for t in self.down_block_types if t != DOWN_BLOCK}
                 | {t for t in self.up_block_types if t != UP_BLOCK})
    if bad:
      raise ConfigError(f"CogVideoX VAE config: unsupported block type(s) {bad}; supported: {DOWN_BLOCK}, {UP_BLOCK}")
    if self.act_fn not in SUPPORTED_ACTS:
      raise ConfigError(f"CogVideoX VAE config: unsupported act_fn {self.act_fn!r}; supported: {SUPPORTED_ACTS}")
    n = len(self.block_out_channels)
    if len(self.down_block_types) != n or len(self.up_block_types) != n:
      raise ConfigError(f"CogVideoX VAE config: down_block_types ({len(self.down_block_types)}), up_block_types "
                        f"({len(self.up_block_types)}) and block_out_channels ({n}) must have the same length")
    for c in self.block_out_channels:
      if c % self.norm_num_groups:
        raise ConfigError(f"CogVideoX VAE config: block_out_channels {c} not divisible by norm_num_groups "
                          f"{self.norm_num_groups}")
    ratio = self.temporal_compression_ratio
    if ratio < 1 or 2 ** round(math.log2(ratio)) != ratio:
      raise ConfigError(f"CogVideoX VAE config: temporal_compression_ratio {ratio} is not a power of two")
    for key in ("use_quant_conv", "use_post_quant_conv"):
      if getattr(self, key):  # Diffusers' quant conv widths follow out_channels, not latent_channels: not modelled
        raise ConfigError(f"CogVideoX VAE config: {key}=true is not modelled (the published VAEs have false)")

  @property
  def time_compressing_blocks(self) -> int:
    """How many leading down (and up) blocks halve (double) time, as Diffusers' `i < log2(ratio)`."""
    return int(np.log2(self.temporal_compression_ratio))

  @property
  def spatial_factor(self) -> int:
    """Pixels per latent along height and width."""
    return 2 ** (len(self.block_out_channels) - 1)

  @property
  def temporal_factor(self) -> int:
    """Frames per latent frame (after the first): only blocks with a sampler can halve time, so a config
    with fewer blocks than log2(temporal_compression_ratio) + 1 compresses less than its ratio says."""
    return 2 ** min(self.time_compressing_blocks, len(self.block_out_channels) - 1)


# ---- layers ------------------------------------------------------------------------------------------


def _nearest(x, size: Tuple[int, int, int]):
  """PyTorch's "nearest" resize of (B, T, H, W, C) to `size` (source index floor(i * in / out) in float32)."""
  for axis, out in zip((1, 2, 3), size):
    n = x.shape[axis]
    if out % n == 0:  # the decoder's case (power-of-two ratios): the same indices, i // r, as a cheaper repeat
      x = jnp.repeat(x, out // n, axis=axis)
    else:
      idx = np.minimum(np.floor(np.arange(out, dtype=np.float32) * np.float32(n / out)), n - 1).astype(np.int32)
      x = jnp.take(x, idx, axis=axis)
  return x


def _resize_zq(zq, size: Tuple[int, int, int]):
  """Latents resized to a decoder feature map; an odd frame count > 1 keeps the first frame apart (it maps to
  the first latent frame alone), as Diffusers' SpatialNorm3D does."""
  t = size[0]
  if t > 1 and t % 2 == 1:
    return jnp.concatenate([_nearest(zq[:, :1], (1,) + size[1:]), _nearest(zq[:, 1:], (t - 1,) + size[1:])], 1)
  return _nearest(zq, size)


class CausalConv3d(nn.Module):
  """Diffusers' CogVideoXCausalConv3d (pad mode "first"): time is padded on the past only, with copies of the
  first frame when no cache is given, else with the cache (the last kernel - 1 padded input frames of the
  previous frame batch); height and width are zero-padded by the conv. Returns (output, new cache).

  Diffusers' other pad mode ("replicate": edge padding in all three axes, no cache) is not modelled: every
  CogVideoX block is built with "first", and no config key changes it. Its CogVideoXSafeConv3d, which splits huge inputs along time with kernel - 1 frames of
  overlap, computes the same function as one conv, so it needs no counterpart here."""

  features: int
  kernel: int = 3
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, cache=None):
    new_cache = None
    if self.kernel > 1:
      past = cache if cache is not None else jnp.repeat(x[:, :1], self.kernel - 1, axis=1)
      x = jnp.concatenate([past.astype(x.dtype), x], axis=1)
      new_cache = x[:, -(self.kernel - 1):]
    conv = layers.conv3d(self.features, "conv", dtype=self.dtype, param_dtype=self.param_dtype, kernel=self.kernel)
    return conv(x), new_cache


class SpatialNorm3D(nn.Module):
  """GroupNorm modulated by the latents: norm(f) * conv_y(zq) + conv_b(zq) (the decoder's norm)."""

  groups: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, f, zq):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    zq = _resize_zq(zq, f.shape[1:4])
    y, _ = CausalConv3d(f.shape[-1], kernel=1, name="conv_y", **kw)(zq)
    b, _ = CausalConv3d(f.shape[-1], kernel=1, name="conv_b", **kw)(zq)
    return layers.group_norm(self.groups, FIXED_EPS, "norm_layer", **kw)(f) * y + b


class ResnetBlock3D(nn.Module):
  """norm, silu, causal conv, twice, plus a 1x1x1 conv shortcut when the width changes. The decoder's
  norms are SpatialNorm3D on the latents `zq`."""

  out_channels: int
  groups: int
  eps: float
  spatial_norm: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, zq=None, cache: Optional[Cache] = None):
    cache, new = cache or {}, {}
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

    def norm(name, h):
      if self.spatial_norm:
        return SpatialNorm3D(self.groups, name=name, **kw)(h, zq)
      return layers.group_norm(self.groups, self.eps, name, **kw)(h)

    h = nn.silu(norm("norm1", x))
    h, new["conv1"] = CausalConv3d(self.out_channels, name="conv1", **kw)(h, cache.get("conv1"))
    h = nn.silu(norm("norm2", h))
    h, new["conv2"] = CausalConv3d(self.out_channels, name="conv2", **kw)(h, cache.get("conv2"))
    if x.shape[-1] != self.out_channels:
      x = layers.conv3d(self.out_channels, "conv_shortcut", kernel=1, **kw)(x)
    return h + x, new


def _per_frame_conv(x, conv):
  """A 2-D conv applied to every frame of (B, T, H, W, C)."""
  b, t = x.shape[:2]
  y = conv(x.reshape((b * t,) + x.shape[2:]))
  return y.reshape((b, t) + y.shape[1:])


class Downsample3D(nn.Module):
  """Optionally halves time (mean of frame pairs; an odd count keeps its first frame alone), then pads
  height/width by (0, 1) and applies a stride-2 3x3 conv per frame."""

  channels: int
  compress_time: bool
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.compress_time:
      first, rest = (x[:, :1], x[:, 1:]) if x.shape[1] % 2 else (None, x)
      if rest.shape[1]:
        rest = (rest[:, 0::2] + rest[:, 1::2]) / 2
      x = rest if first is None else jnp.concatenate([first, rest], axis=1)
    x = jnp.pad(x, ((0, 0), (0, 0), (0, 1), (0, 1), (0, 0)))
    conv = layers.conv(self.channels, "conv", dtype=self.dtype, param_dtype=self.param_dtype, stride=2,
                       padding="VALID")
    return _per_frame_conv(x, conv)


def _repeat2(x, axes):
  for axis in axes:
    x = jnp.repeat(x, 2, axis=axis)
  return x


class Upsample3D(nn.Module):
  """Nearest 2x in height/width and, when compressing time with more than one frame, 2x in time (an odd
  count keeps its first frame single); then a 3x3 conv per frame."""

  channels: int
  compress_time: bool
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    t = x.shape[1]
    if self.compress_time and t > 1 and t % 2:
      x = jnp.concatenate([_repeat2(x[:, :1], (2, 3)), _repeat2(x[:, 1:], (1, 2, 3))], axis=1)
    elif self.compress_time and t > 1:
      x = _repeat2(x, (1, 2, 3))
    else:
      x = _repeat2(x, (2, 3))
    conv = layers.conv(self.channels, "conv", dtype=self.dtype, param_dtype=self.param_dtype)
    return _per_frame_conv(x, conv)


class _Block(nn.Module):
  """Diffusers' CogVideoX{Down,Mid,Up}Block3D: `num_layers` resnets, then an optional down/up sampler."""

  out_channels: int
  num_layers: int
  groups: int
  eps: float
  spatial_norm: bool = False  # decoder blocks: SpatialNorm3D on zq
  sampler: Optional[str] = None  # "down", "up" or None
  compress_time: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, zq=None, cache: Optional[Cache] = None):
    cache, new = cache or {}, {}
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for i in range(self.num_layers):
      name = f"resnets_{i}"
      x, new[name] = ResnetBlock3D(self.out_channels, self.groups, self.eps, self.spatial_norm, name=name, **kw)(
          x, zq, cache.get(name))
    if self.sampler == "down":
      x = Downsample3D(self.out_channels, self.compress_time, name="downsamplers_0", **kw)(x)
    elif self.sampler == "up":
      x = Upsample3D(self.out_channels, self.compress_time, name="upsamplers_0", **kw)(x)
    return x, new


class Encoder(nn.Module):
  config: CogVideoXVAEConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, cache: Optional[Cache] = None):
    """(B, T, H, W, C_in) -> (moments (B, T_lat, h, w, 2 * latent), new cache)."""
    cfg, cache, new = self.config, cache or {}, {}
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    chans, g = cfg.block_out_channels, cfg.norm_num_groups
    x, new["conv_in"] = CausalConv3d(chans[0], name="conv_in", **kw)(x, cache.get("conv_in"))
    for i, ch in enumerate(chans):
      name = f"down_blocks_{i}"
      sampler = "down" if i < len(chans) - 1 else None
      x, new[name] = _Block(ch, cfg.layers_per_block, g, cfg.norm_eps, False, sampler,
                            i < cfg.time_compressing_blocks, name=name, **kw)(x, None, cache.get(name))
    x, new["mid_block"] = _Block(chans[-1], 2, g, cfg.norm_eps, name="mid_block", **kw)(
        x, None, cache.get("mid_block"))
    x = nn.silu(layers.group_norm(g, FIXED_EPS, "norm_out", **kw)(x))
    x, new["conv_out"] = CausalConv3d(2 * cfg.latent_channels, name="conv_out", **kw)(x, cache.get("conv_out"))
    return x, new


class Decoder(nn.Module):
  config: CogVideoXVAEConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z, cache: Optional[Cache] = None):
    """(B, T_lat, h, w, latent) -> (video (B, T, H, W, C_out), new cache). Every norm is conditioned on `z`."""
    cfg, cache, new = self.config, cache or {}, {}
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    chans, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
    x, new["conv_in"] = CausalConv3d(chans[0], name="conv_in", **kw)(z, cache.get("conv_in"))
    x, new["mid_block"] = _Block(chans[0], 2, g, FIXED_EPS, True, name="mid_block", **kw)(
        x, z, cache.get("mid_block"))
    for i, ch in enumerate(chans):
      name = f"up_blocks_{i}"
      sampler = "up" if i < len(chans) - 1 else None
      x, new[name] = _Block(ch, cfg.layers_per_block + 1, g, FIXED_EPS, True, sampler,
                            i < cfg.time_compressing_blocks, name=name, **kw)(x, z, cache.get(name))
    x = nn.silu(SpatialNorm3D(g, name="norm_out", **kw)(x, z))
    x, new["conv_out"] = CausalConv3d(cfg.out_channels, name="conv_out", **kw)(x, cache.get("conv_out"))
    return x, new


class AutoencoderKLCogVideoX(nn.Module):
  """The encoder and decoder on one frame batch each, channels-last, with explicit conv caches."""

  config: CogVideoXVAEConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.encoder = Encoder(self.config, **kw)
    self.decoder = Decoder(self.config, **kw)

  def encode_frames(self, x, cache: Optional[Cache] = None):
    return self.encoder(x, cache)

  def decode_frames(self, z, cache: Optional[Cache] = None):
    return self.decoder(z, cache)

  def __call__(self, x):
    """Reconstruction through the mean (used for init)."""
    moments, _ = self.encoder(x)
    return self.decoder(moments[..., :self.config.latent_channels])[0]

  def dummy_video(self):
    """The smallest channels-last video the encoder takes: one frame of spatial_factor^2 pixels."""
    s = self.config.spatial_factor
    return jnp.zeros((1, 1, s, s, self.config.in_channels), self.dtype)

  def init_params(self, rng: jax.Array):
    """Random parameters, unboxed; jitted (eager init of the conv stack runs op by op, ~10x slower)."""
    return jax.jit(lambda r: nn.unbox(self.init(r, self.dummy_video())["params"]))(rng)

  def abstract_variables(self):
    """`jax.eval_shape` of init: boxed ShapeDtypeStructs carrying logical axis names."""
    return jax.eval_shape(lambda: self.init(jax.random.PRNGKey(0), self.dummy_video()))


# ---- frame batching, tiling and the public functions ----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Tiling:
  """Diffusers' `enable_tiling` settings. Sizes are in pixels; None takes half the config's sample size
  (Diffusers' default), overlaps default to Diffusers' 1/6 (height) and 1/5 (width)."""

  sample_height: Optional[int] = None
  sample_width: Optional[int] = None
  overlap_factor_height: float = 1 / 6
  overlap_factor_width: float = 1 / 5

  def sizes(self, config: CogVideoXVAEConfig) -> Tuple[int, int, int, int]:
    """(sample height, sample width, latent height, latent width) of a tile, as Diffusers rounds them."""
    h = self.sample_height or config.sample_height // 2
    w = self.sample_width or config.sample_width // 2
    return h, w, int(h / config.spatial_factor), int(w / config.spatial_factor)


def frame_batches(num_frames: int, batch_size: int) -> List[Tuple[int, int]]:
  """Diffusers' frame batches: `num_frames // batch_size` batches (at least one), the remainder going to the
  first (so 49 frames in batches of 8 are 9, 8, 8, 8, 8, 8)."""
  rem = num_frames % batch_size
  return [(0 if i == 0 else batch_size * i + rem, batch_size * (i + 1) + rem)
          for i in range(max(num_frames // batch_size, 1))]


@functools.lru_cache(maxsize=None)
def _steps(config: CogVideoXVAEConfig, dtype) -> Tuple[Any, Any]:
  """Jitted (encode one frame batch, decode one frame batch): compiled once per shape when called eagerly,
  inlined when the caller jits `encode` / `decode` whole."""
  model = AutoencoderKLCogVideoX(config, dtype=dtype)
  enc = jax.jit(lambda p, x, c: model.apply({"params": p}, x, c, method=AutoencoderKLCogVideoX.encode_frames))
  dec = jax.jit(lambda p, z, c: model.apply({"params": p}, z, c, method=AutoencoderKLCogVideoX.decode_frames))
  return enc, dec


def _in_frame_batches(step, params, x, batch_size: int):
  """`step` over Diffusers' frame batches of channels-last `x`, the conv cache carried from batch to batch.

  The first batch (which takes the remainder and has no cache) is one call; the equal batches after it are
  one `lax.scan`, so a jitted 49-frame decode holds two copies of the decoder, not seven."""
  batches = frame_batches(x.shape[1], batch_size)
  first, cache = step(params, x[:, :batches[0][1]], None)
  if len(batches) == 1:
    return first
  if len(batches) == 2:  # no loop for one more batch: XLA:CPU ran a 9-frame decode's gradient 5x slower in one
    return jnp.concatenate([first, step(params, x[:, batches[0][1]:], cache)[0]], axis=1)
  rest = x[:, batches[0][1]:]
  rest = jnp.swapaxes(rest.reshape((rest.shape[0], len(batches) - 1, batch_size) + rest.shape[2:]), 0, 1)

  def body(carry, frames):
    y, carry = step(params, frames, carry)
    return carry, y

  _, ys = jax.lax.scan(body, cache, rest)
  ys = jnp.swapaxes(ys, 0, 1)
  return jnp.concatenate([first, ys.reshape((ys.shape[0], -1) + ys.shape[3:])], axis=1)


def _blend(a, b, extent: int, axis: int):
  """b's first `extent` rows along `axis` faded in from a's last ones (Diffusers' blend_v / blend_h)."""
  extent = min(a.shape[axis], b.shape[axis], extent)
  if extent <= 0:
    return b
  shape = [1] * b.ndim
  shape[axis] = extent
  w = np.array([y / extent for y in range(extent)], np.float32).reshape(shape)
  keep = np.array([1 - y / extent for y in range(extent)], np.float32).reshape(shape)
  head = (jax.lax.slice_in_dim(a, a.shape[axis] - extent, a.shape[axis], axis=axis) * keep
          + jax.lax.slice_in_dim(b, 0, extent, axis=axis) * w)
  return jnp.concatenate([head, jax.lax.slice_in_dim(b, extent, b.shape[axis], axis=axis)], axis=axis)


def _tiled(run, x, tile: Tuple[int, int], stride: Tuple[int, int], blend: Tuple[int, int],
           keep: Tuple[int, int]):
  """Diffusers' spatial tiling of channels-last `x`: `run` on overlapping tiles, each tile blended with the
  (already blended) tiles above and to its left, then cropped to `keep` and stitched.

  Tiles of one shape go through one `lax.map` (one after another, as Diffusers runs them): a jitted
  480x720 decode then holds one copy of the decoder per tile shape (at most four), not one per tile."""
  starts = [(i, j) for i in range(0, x.shape[2], stride[0]) for j in range(0, x.shape[3], stride[1])]
  by_shape: Dict[Tuple[int, int], list] = {}
  for i, j in starts:
    by_shape.setdefault((min(tile[0], x.shape[2] - i), min(tile[1], x.shape[3] - j)), []).append((i, j))
  out = {}
  for (h, w), group in by_shape.items():
    if len(group) == 1:
      out[group[0]] = run(x[:, :, group[0][0]:group[0][0] + h, group[0][1]:group[0][1] + w])
      continue
    ys = jax.lax.map(run, jnp.stack([x[:, :, i:i + h, j:j + w] for i, j in group]))
    out.update({ij: ys[k] for k, ij in enumerate(group)})
  rows: List[list] = []
  for i in range(0, x.shape[2], stride[0]):
    row = []
    for j in range(0, x.shape[3], stride[1]):
      t = out[(i, j)]
      if rows:
        t = _blend(rows[-1][len(row)], t, blend[0], axis=2)
      if row:
        t = _blend(row[-1], t, blend[1], axis=3)
      row.append(t)
    rows.append(row)
  return jnp.concatenate([jnp.concatenate([t[:, :, :keep[0], :keep[1]] for t in row], axis=3) for row in rows],
                         axis=2)


def _to_channels_last(x):
  return jnp.transpose(x, (0, 2, 3, 4, 1))


def _to_channels_first(x):
  return jnp.transpose(x, (0, 4, 1, 2, 3))


def encode(params, video, config: CogVideoXVAEConfig, *, use_tiling: bool = False, tiling: Optional[Tiling] = None,
           frame_batch_size: int = SAMPLE_FRAMES_BATCH, dtype: Any = jnp.float32):
  """Video (B, C, F, H, W) in [-1, 1] -> (mean, logvar) of the latent distribution, each (B, latent, F_lat, h, w).

  Frames go through the encoder in Diffusers' frame batches with the conv cache; with `use_tiling` (and the
  frame larger than a tile) in overlapping spatial tiles blended as Diffusers does. logvar is clamped to
  [-30, 20] as Diffusers' DiagonalGaussianDistribution does."""
  enc, _ = _steps(config, dtype)
  x = _to_channels_last(jnp.asarray(video, dtype))
  run = lambda t: _in_frame_batches(enc, params, t, frame_batch_size)
  tiling = tiling or Tiling()
  th, tw, lh, lw = tiling.sizes(config)
  if use_tiling and (x.shape[3] > tw or x.shape[2] > th):
    fh, fw = tiling.overlap_factor_height, tiling.overlap_factor_width
    bh, bw = int(lh * fh), int(lw * fw)
    moments = _tiled(run, x, (th, tw), (int(th * (1 - fh)), int(tw * (1 - fw))), (bh, bw), (lh - bh, lw - bw))
  else:
    moments = run(x)
  mean, logvar = jnp.split(_to_channels_first(moments), 2, axis=1)
  return mean, jnp.clip(logvar, -30.0, 20.0)


def decode(params, latents, config: CogVideoXVAEConfig, *, use_tiling: bool = False, tiling: Optional[Tiling] = None,
           frame_batch_size: int = LATENT_FRAMES_BATCH, dtype: Any = jnp.float32):
  """Unscaled latents (B, latent, F_lat, h, w) -> video (B, C_out, F, H, W).

  Latent frames go through the decoder in Diffusers' batches (2, the remainder with the first) with the conv
  cache, so F = 1 + 4 (F_lat - 1) for an odd F_lat (13 -> 49) and 4 F_lat for an even one, as Diffusers gives;
  with `use_tiling` (and latents larger than a tile) in overlapping spatial tiles, blended as Diffusers does."""
  _, dec = _steps(config, dtype)
  z = _to_channels_last(jnp.asarray(latents, dtype))
  run = lambda t: _in_frame_batches(dec, params, t, frame_batch_size)
  tiling = tiling or Tiling()
  th, tw, lh, lw = tiling.sizes(config)
  if use_tiling and (z.shape[3] > lw or z.shape[2] > lh):
    fh, fw = tiling.overlap_factor_height, tiling.overlap_factor_width
    bh, bw = int(th * fh), int(tw * fw)
    video = _tiled(run, z, (lh, lw), (int(lh * (1 - fh)), int(lw * (1 - fw))), (bh, bw), (th - bh, tw - bw))
  else:
    video = run(z)
  return _to_channels_first(video)
