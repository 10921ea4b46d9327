"""AutoencoderKL (the Stable Diffusion VAE) in Flax linen, equal to `diffusers.AutoencoderKL`.

Layout: activations are NHWC inside; the public `encode` / `decode` take and return NCHW like
Diffusers. Submodule names mirror Diffusers' parameter names (`down_blocks.0` -> `down_blocks_0`),
so conversion is a renaming plus OIHW -> HWIO / transposed dense kernels (`tdm_jax/convert/vae.py`).

Supported: DownEncoderBlock2D encoder blocks, UpDecoderBlock2D decoder blocks, SiLU, GroupNorm
(eps 1e-6), a single-head self-attention in each mid block (optional), optional quant convs.

Usage:
  model = AutoencoderKL(VAEConfig.from_dict(config_json))
  mean, logvar = model.apply({"params": params}, x_nchw, method=model.encode)
  x = model.apply({"params": params}, z_nchw, method=model.decode)
  z = model.latents_from_images(params, x_nchw, key)     # scaled latents, as pipelines feed a UNet
  x = model.images_from_latents(params, z)                # inverse scaling + decode
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from tdm_jax.infra.errors import ConfigError
from tdm_jax.models import layers
from tdm_jax.models.blocks import Attention, ResnetBlock2D, Upsample2D

SUPPORTED_DOWN_BLOCKS = ("DownEncoderBlock2D",)
SUPPORTED_UP_BLOCKS = ("UpDecoderBlock2D",)
SUPPORTED_ACTS = ("silu",)
NORM_EPS = 1e-6



@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """The fields of a Diffusers AutoencoderKL `config.json` that define the network."""

  in_channels: int = 3
  out_channels: int = 3
  down_block_types: Tuple[str, ...] = ("DownEncoderBlock2D",)
  up_block_types: Tuple[str, ...] = ("UpDecoderBlock2D",)
  block_out_channels: Tuple[int, ...] = (64,)
  layers_per_block: int = 1
  act_fn: str = "silu"
  latent_channels: int = 4
  norm_num_groups: int = 32
  sample_size: int = 32
  scaling_factor: float = 0.18215
  shift_factor: Optional[float] = None
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "VAEConfig":
    """Builds a config from a Diffusers vae config dict; unrelated keys are ignored."""
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in d.items() if k in names}
    for key in ("down_block_types", "up_block_types", "block_out_channels"):
      if key in kwargs:
        kwargs[key] = tuple(kwargs[key])
    for key in ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
      if kwargs.get(key, True) is None:  # Diffusers treats null as the default (true).
        kwargs[key] = True
    config = cls(**kwargs)
    config.validate()
    return config

  def validate(self) -> None:
    for t in self.down_block_types:
      if t not in SUPPORTED_DOWN_BLOCKS:
        raise ConfigError(f"unsupported VAE down block type {t!r}; supported: {SUPPORTED_DOWN_BLOCKS}")
    for t in self.up_block_types:
      if t not in SUPPORTED_UP_BLOCKS:
        raise ConfigError(f"unsupported VAE up block type {t!r}; supported: {SUPPORTED_UP_BLOCKS}")
    if self.act_fn not in SUPPORTED_ACTS:
      raise ConfigError(f"unsupported VAE act_fn {self.act_fn!r}; supported: {SUPPORTED_ACTS}")
    n = len(self.block_out_channels)
    if len(self.down_block_types) != n or len(self.up_block_types) != n:
      raise ConfigError(
          f"VAE config: down_block_types ({len(self.down_block_types)}), up_block_types "
          f"({len(self.up_block_types)}) and block_out_channels ({n}) must have the same length")
    for c in self.block_out_channels:
      if c % self.norm_num_groups:
        raise ConfigError(f"VAE config: block_out_channels {c} not divisible by norm_num_groups "
                          f"{self.norm_num_groups}")


def _conv(features: int, kernel: int, name: str, dtype, param_dtype, stride: int = 1,
          padding: Any = None) -> nn.Conv:
  return layers.conv(features, name, dtype=dtype, param_dtype=param_dtype, kernel=kernel, stride=stride,
                     padding=padding)


def _group_norm(groups: int, name: str, dtype, param_dtype) -> nn.GroupNorm:
  return layers.group_norm(groups, NORM_EPS, name, dtype=dtype, param_dtype=param_dtype)


def _resnet(channels: int, groups: int, name: str, **kw) -> ResnetBlock2D:
  return ResnetBlock2D(out_channels=channels, groups=groups, eps=NORM_EPS, name=name, **kw)


class MidBlock(nn.Module):
  """resnet, (attention, resnet)."""

  channels: int
  groups: int
  add_attention: bool = True
  attention_implementation: str = "auto"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = _resnet(self.channels, self.groups, "resnets_0", **kw)(x)
    if self.add_attention:
      x = Attention(heads=1, head_dim=self.channels, qkv_bias=True, norm_groups=self.groups, norm_eps=NORM_EPS,
                    residual=True, implementation=self.attention_implementation, name="attentions_0", **kw)(x)
    return _resnet(self.channels, self.groups, "resnets_1", **kw)(x)


class Downsample(nn.Module):
  """Pad (0, 1, 0, 1) on height/width, then a stride-2 3x3 conv (Diffusers' encoder)."""

  channels: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return _conv(self.channels, 3, "conv", self.dtype, self.param_dtype, stride=2, padding="VALID")(x)


class Encoder(nn.Module):
  config: VAEConfig
  attention_implementation: str = "auto"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    g = cfg.norm_num_groups
    x = _conv(cfg.block_out_channels[0], 3, "conv_in", **kw)(x)
    for i, ch in enumerate(cfg.block_out_channels):
      for j in range(cfg.layers_per_block):
        x = _resnet(ch, g, f"down_blocks_{i}_resnets_{j}", **kw)(x)
      if i < len(cfg.block_out_channels) - 1:
        x = Downsample(ch, name=f"down_blocks_{i}_downsamplers_0", **kw)(x)
    x = MidBlock(cfg.block_out_channels[-1], g, cfg.mid_block_add_attention,
                 self.attention_implementation, name="mid_block", **kw)(x)
    x = nn.silu(_group_norm(g, "conv_norm_out", **kw)(x))
    return _conv(2 * cfg.latent_channels, 3, "conv_out", **kw)(x)


class Decoder(nn.Module):
  config: VAEConfig
  attention_implementation: str = "auto"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z):
    cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    g = cfg.norm_num_groups
    chans = tuple(reversed(cfg.block_out_channels))
    x = _conv(chans[0], 3, "conv_in", **kw)(z)
    x = MidBlock(chans[0], g, cfg.mid_block_add_attention, self.attention_implementation,
                 name="mid_block", **kw)(x)
    for i, ch in enumerate(chans):
      for j in range(cfg.layers_per_block + 1):
        x = _resnet(ch, g, f"up_blocks_{i}_resnets_{j}", **kw)(x)
      if i < len(chans) - 1:
        x = Upsample2D(channels=ch, name=f"up_blocks_{i}_upsamplers_0", **kw)(x)
    x = nn.silu(_group_norm(g, "conv_norm_out", **kw)(x))
    return _conv(cfg.out_channels, 3, "conv_out", **kw)(x)


def _nchw_to_nhwc(x):
  return jnp.transpose(x, (0, 2, 3, 1))


def _nhwc_to_nchw(x):
  return jnp.transpose(x, (0, 3, 1, 2))


class AutoencoderKL(nn.Module):
  """Diffusers' AutoencoderKL. Public methods take and return NCHW."""

  config: VAEConfig
  attention_implementation: str = "auto"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.encoder = Encoder(cfg, self.attention_implementation, **kw)
    self.decoder = Decoder(cfg, self.attention_implementation, **kw)
    if cfg.use_quant_conv:
      self.quant_conv = _conv(2 * cfg.latent_channels, 1, "quant_conv", **kw)
    if cfg.use_post_quant_conv:
      self.post_quant_conv = _conv(cfg.latent_channels, 1, "post_quant_conv", **kw)

  def encode(self, x_nchw):
    """Images (B, C, H, W) -> (mean, logvar) of the latent distribution, each (B, latent, h, w).

    logvar is clamped to [-30, 20] as Diffusers' DiagonalGaussianDistribution does.
    """
    h = self.encoder(_nchw_to_nhwc(x_nchw))
    if self.config.use_quant_conv:
      h = self.quant_conv(h)
    mean, logvar = jnp.split(h, 2, axis=-1)
    logvar = jnp.clip(logvar, -30.0, 20.0)
    return _nhwc_to_nchw(mean), _nhwc_to_nchw(logvar)

  def decode(self, z_nchw):
    """Unscaled latents (B, latent, h, w) -> images (B, out_channels, H, W)."""
    z = _nchw_to_nhwc(z_nchw)
    if self.config.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return _nhwc_to_nchw(self.decoder(z))

  def __call__(self, x_nchw):
    """Reconstruction through the mean latent (used for init)."""
    mean, _ = self.encode(x_nchw)
    return self.decode(mean)

  # ---- helpers on the unbound module -----------------------------------------------------

  def dummy_images(self, batch: int = 1):
    """A zero image batch, the smallest the encoder accepts (for init / eval_shape)."""
    size = 2 ** (len(self.config.block_out_channels) - 1)
    return jnp.zeros((batch, self.config.in_channels, size, size), self.dtype)

  def init_params(self, rng: jax.Array):
    """Random parameters, unboxed (logical axis metadata is available via `abstract_variables`)."""
    return nn.unbox(self.init(rng, self.dummy_images())["params"])

  def abstract_variables(self):
    """`jax.eval_shape` of init: boxed ShapeDtypeStructs carrying logical axis names."""
    return jax.eval_shape(lambda: self.init(jax.random.PRNGKey(0), self.dummy_images()))

  def latents_from_images(self, params, x_nchw, key: Optional[jax.Array] = None):
    """Images in [-1, 1] (NCHW) -> latents as pipelines feed the denoiser.

    The posterior mean when `key` is None, else a sample mean + std * eps; then
    (z - shift_factor) * scaling_factor (shift 0 when the config has none).
    """
    mean, logvar = self.apply({"params": params}, x_nchw, method=AutoencoderKL.encode)
    z = mean
    if key is not None:
      z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
    shift = self.config.shift_factor or 0.0
    return (z - shift) * self.config.scaling_factor

  def images_from_latents(self, params, z_nchw):
    """Scaled latents -> images: z / scaling_factor + shift_factor, then decode."""
    shift = self.config.shift_factor or 0.0
    z = z_nchw / self.config.scaling_factor + shift
    return self.apply({"params": params}, z, method=AutoencoderKL.decode)
