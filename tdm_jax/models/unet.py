"""UNet2DConditionModel (SD 1.5 / 2.x / SDXL) in Flax linen, equal to Diffusers' on the same weights.

Public call mirrors Diffusers: NCHW sample in, NCHW prediction out; NHWC inside. Module names mirror
Diffusers' parameter names (`down_blocks_1/attentions_0/transformer_blocks_0/attn1/to_q` for
`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`), so conversion is a renaming plus a
layout change (see `tdm_jax/convert/unet.py`). Every parameter carries logical axis names.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Tuple, Union

import flax.linen as nn
import jax.numpy as jnp

from tdm_jax.infra.errors import ConfigError
from tdm_jax.models import layers
from tdm_jax.models.blocks import Attention, FeedForward, ResnetBlock2D, Upsample2D
from tdm_jax.models.blocks import conv as _conv, dense as _dense, group_norm as _group_norm
from tdm_jax.models.embeddings import TimestepEmbedding, timestep_embedding
from tdm_jax.models.remat import rematerialised

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", None)

# Keys whose only supported value is fixed: (supported values). A key absent from the dict takes
# Diffusers' default, which is always supported.
_FIXED = {
    "time_embedding_type": ("positional",),
    "addition_embed_type": (None, "text_time"),
    "act_fn": ("silu",),
    "resnet_time_scale_shift": ("default",),
    "only_cross_attention": (False,),
    "dual_cross_attention": (False,),
    "class_embed_type": (None,),
    "center_input_sample": (False,),
    "num_attention_heads": (None,),  # Diffusers itself refuses it (naming issue 2011).
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "downsample_padding": (1,),
    "mid_block_scale_factor": (1, 1.0),
    "resnet_out_scale_factor": (1, 1.0),
    "resnet_skip_time_act": (False,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "class_embeddings_concat": (False,),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "attention_type": ("default",),
    "cross_attention_norm": (None,),
    "mid_block_only_cross_attention": (None, False),
    "reverse_transformer_layers_per_block": (None,),
}


def _unsupported(key, value, supported):
  return ValueError(f"unet config: unsupported {key}={value!r}; supported: {supported}")


def _tuple_or_int(value):
  return tuple(value) if isinstance(value, (list, tuple)) else value


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """The subset of Diffusers' UNet2DConditionModel config that SD 1.5/2.x and SDXL use.

  Defaults are Diffusers' defaults. `attention_head_dim` keeps Diffusers' quirk: it is the NUMBER
  of heads per block (head size = block channels // heads); see `heads_per_block`.
  """
  sample_size: Optional[int] = None
  in_channels: int = 4
  out_channels: int = 4
  down_block_types: Tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
  up_block_types: Tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
  mid_block_type: Optional[str] = "UNetMidBlock2DCrossAttn"
  block_out_channels: Tuple[int, ...] = (320, 640, 1280, 1280)
  layers_per_block: Union[int, Tuple[int, ...]] = 2
  attention_head_dim: Union[int, Tuple[int, ...]] = 8
  num_attention_heads: Optional[Union[int, Tuple[int, ...]]] = None
  cross_attention_dim: int = 1280
  use_linear_projection: bool = False
  transformer_layers_per_block: Union[int, Tuple[int, ...]] = 1
  upcast_attention: bool = False
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  time_embedding_type: str = "positional"
  addition_embed_type: Optional[str] = None
  addition_time_embed_dim: Optional[int] = None
  projection_class_embeddings_input_dim: Optional[int] = None
  act_fn: str = "silu"
  resnet_time_scale_shift: str = "default"
  only_cross_attention: bool = False
  dual_cross_attention: bool = False
  class_embed_type: Optional[str] = None
  center_input_sample: bool = False
  # A learned embedding per class label added to the time embedding (Diffusers' `class_embedding`
  # with class_embed_type=None); TDM's unified student carries its step count K this way.
  num_class_embeds: Optional[int] = None
  # LCM-style: a projection of `timestep_cond` added to the sinusoids; stock pipelines then skip CFG.
  time_cond_proj_dim: Optional[int] = None

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "UNetConfig":
    """Builds from a Diffusers unet config.json dict; unrelated keys are ignored."""
    for key, supported in _FIXED.items():
      if key in d and d[key] not in supported:
        raise _unsupported(key, d[key], list(supported))
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: _tuple_or_int(v) for k, v in d.items() if k in names}
    return cls(**kwargs)

  def __post_init__(self):
    n = len(self.down_block_types)
    for t in self.down_block_types:
      if t not in DOWN_BLOCK_TYPES:
        raise _unsupported("down_block_types", t, list(DOWN_BLOCK_TYPES))
    for t in self.up_block_types:
      if t not in UP_BLOCK_TYPES:
        raise _unsupported("up_block_types", t, list(UP_BLOCK_TYPES))
    if self.mid_block_type not in MID_BLOCK_TYPES:
      raise _unsupported("mid_block_type", self.mid_block_type, list(MID_BLOCK_TYPES))
    for key, supported in _FIXED.items():
      if hasattr(self, key) and getattr(self, key) not in supported:
        raise _unsupported(key, getattr(self, key), list(supported))
    if len(self.up_block_types) != n or len(self.block_out_channels) != n:
      raise ConfigError(
          f"unet config: down_block_types ({n}), up_block_types ({len(self.up_block_types)}) and "
          f"block_out_channels ({len(self.block_out_channels)}) must have the same length")
    for key in ("layers_per_block", "attention_head_dim", "transformer_layers_per_block"):
      value = getattr(self, key)
      if isinstance(value, tuple) and len(value) != n:
        raise ConfigError(f"unet config: {key}={value!r} must be an int or have {n} entries")
    if not isinstance(self.cross_attention_dim, int):
      raise _unsupported("cross_attention_dim", self.cross_attention_dim, "a single int")
    if self.norm_num_groups is None:
      raise _unsupported("norm_num_groups", None, "an int")
    if self.addition_embed_type == "text_time" and (
        self.addition_time_embed_dim is None or self.projection_class_embeddings_input_dim is None):
      raise ConfigError("unet config: addition_embed_type='text_time' needs addition_time_embed_dim "
                        "and projection_class_embeddings_input_dim")
    for c, h in zip(self.block_out_channels, self.heads_per_block):
      if c % h:
        raise ConfigError(f"unet config: block channels {c} not divisible by {h} attention heads")

  def _per_block(self, value):
    return tuple(value) if isinstance(value, tuple) else (value,) * len(self.down_block_types)

  @property
  def heads_per_block(self) -> Tuple[int, ...]:
    """Attention heads per down block (Diffusers: num_attention_heads or attention_head_dim)."""
    return self._per_block(self.attention_head_dim)

  @property
  def layers_per_block_list(self) -> Tuple[int, ...]:
    return self._per_block(self.layers_per_block)

  @property
  def transformer_depths(self) -> Tuple[int, ...]:
    return self._per_block(self.transformer_layers_per_block)

  @property
  def time_embed_dim(self) -> int:
    return self.block_out_channels[0] * 4


def _layer_norm(m, name):
  return layers.layer_norm(1e-5, name, dtype=m.dtype, param_dtype=m.param_dtype)


class BasicTransformerBlock(nn.Module):
  heads: int
  head_dim: int
  implementation: str = "auto"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, context):
    kw = dict(heads=self.heads, head_dim=self.head_dim, implementation=self.implementation,
              dtype=self.dtype, param_dtype=self.param_dtype)
    x = x + Attention(**kw, name="attn1")(_layer_norm(self, "norm1")(x))
    x = x + Attention(**kw, cross=True, name="attn2")(_layer_norm(self, "norm2")(x), context)
    x = x + FeedForward(dtype=self.dtype, param_dtype=self.param_dtype, name="ff")(
        _layer_norm(self, "norm3")(x))
    return x


class Transformer2DModel(nn.Module):
  """GroupNorm(eps 1e-6) -> proj_in -> transformer blocks -> proj_out, plus the input."""
  heads: int
  depth: int
  groups: int
  use_linear_projection: bool
  implementation: str = "auto"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x, context):
    b, hgt, wid, c = x.shape
    h = _group_norm(self, self.groups, 1e-6, "norm")(x)
    if self.use_linear_projection:
      h = _dense(self, c, ("embed", "mlp"), "proj_in")(h.reshape(b, hgt * wid, c))
    else:
      h = _conv(self, c, "proj_in", kernel=1)(h).reshape(b, hgt * wid, c)
    for i in range(self.depth):
      block = BasicTransformerBlock(self.heads, c // self.heads, self.implementation, dtype=self.dtype,
                                    param_dtype=self.param_dtype, name=f"transformer_blocks_{i}")
      h = rematerialised(block, h, context) if self.remat else block(h, context)
    if self.use_linear_projection:
      h = _dense(self, c, ("mlp", "embed"), "proj_out")(h).reshape(b, hgt, wid, c)
    else:
      h = _conv(self, c, "proj_out", kernel=1)(h.reshape(b, hgt, wid, c))
    return h + x


class _Block(nn.Module):
  """Shared fields of the down, mid and up blocks."""
  out_channels: int
  num_layers: int
  has_attention: bool
  heads: int
  depth: int
  groups: int
  eps: float
  use_linear_projection: bool
  implementation: str = "auto"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: bool = False

  def resnet(self, x, temb, name):
    block = ResnetBlock2D(out_channels=self.out_channels, groups=self.groups, eps=self.eps, dtype=self.dtype,
                          param_dtype=self.param_dtype, name=name)
    return rematerialised(block, x, temb) if self.remat else block(x, temb)

  def transformer(self, x, context, name):
    return Transformer2DModel(self.heads, self.depth, self.groups, self.use_linear_projection,
                              self.implementation, dtype=self.dtype, param_dtype=self.param_dtype,
                              remat=self.remat, name=name)(x, context)


class DownBlock(_Block):
  """DownBlock2D / CrossAttnDownBlock2D: (resnet [, transformer]) x num_layers [, stride-2 conv].

  Returns the output and every intermediate state the up path consumes.
  """
  add_downsample: bool = True

  @nn.compact
  def __call__(self, x, temb, context):
    states = []
    for j in range(self.num_layers):
      x = self.resnet(x, temb, f"resnets_{j}")
      if self.has_attention:
        x = self.transformer(x, context, f"attentions_{j}")
      states.append(x)
    if self.add_downsample:
      x = Downsample2D(self.out_channels, dtype=self.dtype, param_dtype=self.param_dtype,
                       name="downsamplers_0")(x)
      states.append(x)
    return x, tuple(states)


class MidBlock(_Block):
  """UNetMidBlock2DCrossAttn: resnet, (transformer, resnet) x num_layers."""

  @nn.compact
  def __call__(self, x, temb, context):
    x = self.resnet(x, temb, "resnets_0")
    for j in range(self.num_layers):
      x = self.transformer(x, context, f"attentions_{j}")
      x = self.resnet(x, temb, f"resnets_{j + 1}")
    return x


class UpBlock(_Block):
  """UpBlock2D / CrossAttnUpBlock2D: (concat skip, resnet [, transformer]) x num_layers [, upsample]."""
  add_upsample: bool = True

  @nn.compact
  def __call__(self, x, skips, temb, context):
    for j in range(self.num_layers):
      x = jnp.concatenate([x, skips[-1 - j]], axis=-1)
      x = self.resnet(x, temb, f"resnets_{j}")
      if self.has_attention:
        x = self.transformer(x, context, f"attentions_{j}")
    if self.add_upsample:
      x = Upsample2D(channels=self.out_channels, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="upsamplers_0")(x)
    return x


class Downsample2D(nn.Module):
  channels: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    return _conv(self, self.channels, "conv", stride=2)(x)


class UNet2DConditionModel(nn.Module):
  """Diffusers' UNet2DConditionModel for the configs `UNetConfig` accepts.

  __call__(sample (B, C, H, W), timesteps (B,) or scalar, encoder_hidden_states (B, L, D),
           added_cond_kwargs={"text_embeds": (B, E), "time_ids": (B, 6)} for text_time,
           class_labels (B,) ints with num_class_embeds, timestep_cond (B, time_cond_proj_dim) or None)
  -> (B, C', H, W).
  H and W must be divisible by 2 ** (len(block_out_channels) - 1). `remat` rematerialises each
  resnet and each transformer block in the backward pass (see `models/remat.py`).
  """
  config: UNetConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_implementation: str = "auto"
  remat: bool = False

  @nn.compact
  def __call__(self, sample, timesteps, encoder_hidden_states, added_cond_kwargs=None, class_labels=None,
               timestep_cond=None):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    common = dict(groups=cfg.norm_num_groups, eps=cfg.norm_eps,
                  use_linear_projection=cfg.use_linear_projection,
                  implementation=self.attention_implementation, remat=self.remat, **kw)

    x = jnp.transpose(jnp.asarray(sample), (0, 2, 3, 1)).astype(self.dtype)
    context = jnp.asarray(encoder_hidden_states).astype(self.dtype)
    batch = x.shape[0]

    # Time embedding, plus SDXL's text/time embedding.
    t = jnp.asarray(timesteps)
    t = jnp.broadcast_to(t.reshape(-1), (batch,))
    t_emb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
    emb = TimestepEmbedding(cfg.time_embed_dim, cfg.time_cond_proj_dim, **kw, name="time_embedding")(
        t_emb.astype(self.dtype), timestep_cond)
    if cfg.num_class_embeds is not None:
      if class_labels is None:
        raise ValueError(f"this UNet has num_class_embeds={cfg.num_class_embeds}: pass class_labels (B,)")
      labels = jnp.broadcast_to(jnp.asarray(class_labels, jnp.int32).reshape(-1), (batch,))
      table = nn.Embed(cfg.num_class_embeds, cfg.time_embed_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                       embedding_init=layers.annotated(nn.initializers.normal(1.0), ("classes", "embed")),
                       name="class_embedding")
      emb = emb + table(labels)
    if cfg.addition_embed_type == "text_time":
      if not added_cond_kwargs or "text_embeds" not in added_cond_kwargs or "time_ids" not in added_cond_kwargs:
        raise ValueError("addition_embed_type='text_time' needs added_cond_kwargs with 'text_embeds' and 'time_ids'")
      text_embeds = jnp.asarray(added_cond_kwargs["text_embeds"])
      time_ids = jnp.asarray(added_cond_kwargs["time_ids"]).reshape(-1)
      time_embeds = timestep_embedding(time_ids, cfg.addition_time_embed_dim, cfg.flip_sin_to_cos,
                                       cfg.freq_shift).reshape(text_embeds.shape[0], -1)
      add = jnp.concatenate([text_embeds.astype(self.dtype), time_embeds.astype(self.dtype)], axis=-1)
      emb = emb + TimestepEmbedding(cfg.time_embed_dim, **kw, name="add_embedding")(add)

    x = _conv(self, cfg.block_out_channels[0], "conv_in")(x)
    skips = [x]
    heads, depths, resnets = cfg.heads_per_block, cfg.transformer_depths, cfg.layers_per_block_list
    n = len(cfg.block_out_channels)
    for i, block_type in enumerate(cfg.down_block_types):
      x, states = DownBlock(cfg.block_out_channels[i], resnets[i], block_type == "CrossAttnDownBlock2D",
                           heads[i], depths[i], add_downsample=i < n - 1, **common,
                           name=f"down_blocks_{i}")(x, emb, context)
      skips.extend(states)

    if cfg.mid_block_type == "UNetMidBlock2DCrossAttn":
      x = MidBlock(cfg.block_out_channels[-1], 1, True, heads[-1], depths[-1], **common,
                  name="mid_block")(x, emb, context)

    rev = lambda v: tuple(reversed(v))
    for i, block_type in enumerate(cfg.up_block_types):
      num = rev(resnets)[i] + 1
      block_skips, skips = tuple(skips[-num:]), skips[:-num]
      x = UpBlock(rev(cfg.block_out_channels)[i], num, block_type == "CrossAttnUpBlock2D",
                 rev(heads)[i], rev(depths)[i], add_upsample=i < n - 1, **common,
                 name=f"up_blocks_{i}")(x, block_skips, emb, context)

    x = nn.silu(_group_norm(self, cfg.norm_num_groups, cfg.norm_eps, "conv_norm_out")(x))
    x = _conv(self, cfg.out_channels, "conv_out")(x)
    return jnp.transpose(x, (0, 3, 1, 2))
