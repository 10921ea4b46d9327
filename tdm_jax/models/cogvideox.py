"""CogVideoXTransformer3DModel (CogVideoX-2B and -5B, text to video) in Flax linen, equal to Diffusers'.

A video DiT: each latent frame is cut into patches by one conv (kernel = stride = patch), the T5
caption is projected to the same width, and every block runs ONE full attention over [text; video]
tokens. Text and video share the block's weights, but the "expert" adaptive LayerNorm
(CogVideoXLayerNormZero) gives each its own shift, scale and gate from the timestep embedding.
Queries and keys get a LayerNorm per head. Positions: 2B adds a fixed 3-D sin-cos table to the video
tokens; 5B instead rotates the video tokens' queries and keys by a 3-D rotary table. Diffusers'
pipeline computes 5B's table and passes it in; ours computes it from the latent's shape (the same
numbers), so callers pass nothing but the latents, the timestep and the caption.

Module names mirror Diffusers' state-dict names (`transformer_blocks_3/attn1/to_out_0` for
`transformer_blocks.3.attn1.to_out.0`), so `tdm_jax/convert/cogvideox.py` is a renaming plus layouts.
Blocks are unrolled (named modules, not a scan): names, LoRA regexes and the CPU remat stay per block
as in our other DiTs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Tuple

import flax.linen as nn
import jax.numpy as jnp

from tdm_jax.infra.errors import ConfigError
from tdm_jax.models import layers
from tdm_jax.models.attention import attention
from tdm_jax.models.blocks import dense as _dense
from tdm_jax.models.blocks import FeedForward
from tdm_jax.models.embeddings import (TimestepEmbedding, apply_rotary, rotary_3d, sincos_3d_pos_embed,
                                       timestep_embedding)
from tdm_jax.models.remat import rematerialised

# Every argument of Diffusers' CogVideoXTransformer3DModel.__init__; any other key (bar "_name" keys
# and ours, `num_step_embeds`) is refused rather than silently ignored.
DIFFUSERS_KEYS = (
    "num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "flip_sin_to_cos", "freq_shift",
    "time_embed_dim", "ofs_embed_dim", "text_embed_dim", "num_layers", "dropout", "attention_bias", "sample_width",
    "sample_height", "sample_frames", "patch_size", "patch_size_t", "temporal_compression_ratio",
    "max_text_seq_length", "activation_fn", "timestep_activation_fn", "norm_elementwise_affine", "norm_eps",
    "spatial_interpolation_scale", "temporal_interpolation_scale", "use_rotary_positional_embeddings",
    "use_learned_positional_embeddings", "patch_bias")

# Keys whose only supported value is fixed: (supported values, what the others would need).
_FIXED = {
    "patch_size_t": ((None,), "CogVideoX 1.5's temporal patch is not modelled"),
    "ofs_embed_dim": ((None,), "the image-to-video 1.5 models' `ofs` embedding is not modelled"),
    "use_learned_positional_embeddings": ((False,), "the I2V models' learned position table is not modelled"),
    "dropout": ((0.0,), "inference semantics only: we have no dropout"),
    "activation_fn": (("gelu-approximate",), "the feed-forward is GELU-tanh"),
    "timestep_activation_fn": (("silu",), "the timestep embedder is linear-SiLU-linear"),
}
QK_NORM_EPS = 1e-6  # Diffusers' Attention(qk_norm="layer_norm", eps=1e-6) in every CogVideoXBlock


def _unsupported(key, value, supported, why=""):
  return ConfigError(f"cogvideox config: unsupported {key}={value!r}; supported: {supported}"
                     + (f" ({why})" if why else ""))


@dataclasses.dataclass(frozen=True)
class CogVideoXConfig:
  """Diffusers' CogVideoXTransformer3DModel config with its defaults; `out_channels=None` means
  in_channels. `num_step_embeds` is ours: a (K, time_embed_dim) table whose row `num_steps` is added
  to the timestep embedding (TDM's unified student).

  `sample_height` / `sample_width` (latent pixels) set the base grid the 5B rotary positions are
  spread over; the sin-cos table (2B) is always computed for the actual latent, as Diffusers does.
  `max_text_seq_length` is only Diffusers' size of its stored 2B table; any caption length works here.
  """
  num_attention_heads: int = 30
  attention_head_dim: int = 64
  in_channels: int = 16
  out_channels: Optional[int] = 16
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  time_embed_dim: int = 512
  ofs_embed_dim: Optional[int] = None
  text_embed_dim: int = 4096
  num_layers: int = 30
  dropout: float = 0.0
  attention_bias: bool = True
  sample_width: int = 90
  sample_height: int = 60
  sample_frames: int = 49
  patch_size: int = 2
  patch_size_t: Optional[int] = None
  temporal_compression_ratio: int = 4
  max_text_seq_length: int = 226
  activation_fn: str = "gelu-approximate"
  timestep_activation_fn: str = "silu"
  norm_elementwise_affine: bool = True
  norm_eps: float = 1e-5
  spatial_interpolation_scale: float = 1.875
  temporal_interpolation_scale: float = 1.0
  use_rotary_positional_embeddings: bool = False
  use_learned_positional_embeddings: bool = False
  patch_bias: bool = True
  num_step_embeds: Optional[int] = None

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "CogVideoXConfig":
    """From a Diffusers transformer config.json dict; unknown keys are refused (bar "_" ones)."""
    known = set(DIFFUSERS_KEYS) | {"num_step_embeds"}
    for key in d:
      if not key.startswith("_") and key not in known:
        raise ConfigError(f"cogvideox config: unknown key {key!r}: not an argument of Diffusers' "
                          f"CogVideoXTransformer3DModel; remove it (keys starting with '_' are ignored)")
    return cls(**{k: v for k, v in d.items() if k in known})

  def __post_init__(self):
    for key, (supported, why) in _FIXED.items():
      if getattr(self, key) not in supported:
        raise _unsupported(key, getattr(self, key), list(supported), why)
    if self.use_rotary_positional_embeddings and self.attention_head_dim % 16:
      raise _unsupported("attention_head_dim", self.attention_head_dim,
                         "a multiple of 16 with rotary positions (a quarter for time, 3/8 each for rows and columns)")
    if not self.use_rotary_positional_embeddings and self.inner_dim % 16:
      raise ConfigError(f"cogvideox config: inner dim {self.inner_dim} (heads x head dim) must be divisible by 16 "
                        "for the 3-D sin-cos position table")
    if self.num_step_embeds is not None and self.num_step_embeds < 1:
      raise _unsupported("num_step_embeds", self.num_step_embeds, "None or a positive int")
    if self.out_channels is None:
      object.__setattr__(self, "out_channels", self.in_channels)

  @property
  def inner_dim(self) -> int:
    return self.num_attention_heads * self.attention_head_dim

  @property
  def rotary_base_grid(self) -> Tuple[int, int]:
    """(rows, columns) of patches the rotary positions span (the pipeline's base size)."""
    return self.sample_height // self.patch_size, self.sample_width // self.patch_size


def _layer_norm(m: nn.Module, eps: float, affine: bool, name: str):
  """LayerNorm with float32 statistics (Flax's) in any compute dtype; `scale`/`bias` when affine."""
  if affine:
    return layers.layer_norm(eps, name, dtype=m.dtype, param_dtype=m.param_dtype)
  return nn.LayerNorm(epsilon=eps, use_scale=False, use_bias=False, use_fast_variance=False, dtype=m.dtype,
                      param_dtype=m.param_dtype, name=name)


class PatchEmbed(nn.Module):
  """CogVideoXPatchEmbed: `text_proj` of the caption; `proj` (conv, kernel = stride = patch) of each frame,
  tokens frame-major then row-major, + the 3-D sin-cos table unless the positions are rotary."""
  config: CogVideoXConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, text, video):
    cfg, p = self.config, self.config.patch_size
    text = _dense(self, cfg.inner_dim, ("cross_embed", "embed"), "text_proj")(text)
    b, f, h, w, c = video.shape
    conv = nn.Conv(cfg.inner_dim, (p, p), strides=(p, p), padding=((0, 0), (0, 0)), use_bias=cfg.patch_bias,
                   dtype=self.dtype, param_dtype=self.param_dtype, **layers.BATCH_SPLIT_CONV,
                   kernel_init=layers.annotated(nn.initializers.lecun_normal(), layers.CONV_AXES),
                   bias_init=layers.annotated(nn.initializers.zeros, ("conv_out",)), name="proj")
    x = conv(video.reshape(b * f, h, w, c))
    x = x.reshape(b, f * (h // p) * (w // p), cfg.inner_dim)
    if not cfg.use_rotary_positional_embeddings:
      table = sincos_3d_pos_embed(cfg.inner_dim, f, h // p, w // p, cfg.spatial_interpolation_scale,
                                  cfg.temporal_interpolation_scale)
      x = (x.astype(jnp.float32) + table[None]).astype(self.dtype)
    return text, x


class LayerNormZero(nn.Module):
  """CogVideoXLayerNormZero: SiLU + `linear` of temb to (shift, scale, gate) for the video and then for
  the text tokens; one LayerNorm (`norm`) for both. Returns (video, text) modulated and their gates."""
  eps: float
  affine: bool
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, context, temb):
    dim = x.shape[-1]
    mod = _dense(self, 6 * dim, ("embed", "mlp"), "linear")(nn.silu(temb))
    shift, scale, gate, c_shift, c_scale, c_gate = jnp.split(mod[:, None, :], 6, axis=-1)
    norm = _layer_norm(self, self.eps, self.affine, "norm")
    return norm(x) * (1 + scale) + shift, norm(context) * (1 + c_scale) + c_shift, gate, c_gate


class Attention(nn.Module):
  """Diffusers' Attention with CogVideoXAttnProcessor2_0: one self-attention over [text; video] tokens,
  to_q/to_k/to_v (bias per `bias`), LayerNorm of queries and keys per head (`norm_q`, `norm_k`, eps
  1e-6, affine), the rotary table applied to the video part of queries and keys when given, to_out_0.
  Returns (video, text) outputs."""
  heads: int
  head_dim: int
  bias: bool = True
  rotary: Optional[Tuple[int, ...]] = None  # (frames, grid_h, grid_w, base_h, base_w) of the 5B table
  implementation: str = "auto"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, context):
    inner, text_len = self.heads * self.head_dim, context.shape[1]
    h = jnp.concatenate([context, x], axis=1)
    split = lambda a: a.reshape(a.shape[:2] + (self.heads, self.head_dim))
    q, k, v = (split(_dense(self, inner, ("embed", "heads"), n, use_bias=self.bias)(h))
               for n in ("to_q", "to_k", "to_v"))
    q = layers.layer_norm(QK_NORM_EPS, "norm_q", dtype=self.dtype, param_dtype=self.param_dtype)(q)
    k = layers.layer_norm(QK_NORM_EPS, "norm_k", dtype=self.dtype, param_dtype=self.param_dtype)(k)
    if self.rotary is not None:
      cos, sin = (t[None, :, None, :] for t in rotary_3d(self.head_dim, *self.rotary))
      q = jnp.concatenate([q[:, :text_len], apply_rotary(q[:, text_len:], cos, sin)], axis=1)
      k = jnp.concatenate([k[:, :text_len], apply_rotary(k[:, text_len:], cos, sin)], axis=1)
    out = attention(q, k, v, implementation=self.implementation)
    out = _dense(self, x.shape[-1], ("heads", "embed"), "to_out_0")(out.reshape(out.shape[:2] + (inner,)))
    return out[:, text_len:], out[:, :text_len]


class CogVideoXBlock(nn.Module):
  """Diffusers' CogVideoXBlock: (video, text, temb) -> (video, text).

  norm1 (expert LayerNormZero) -> joint attention, each stream's gated residual; norm2 -> one GELU-tanh
  feed-forward over [text; video] (shared weights), each stream's gated residual.
  """
  heads: int
  head_dim: int
  eps: float = 1e-5
  affine: bool = True
  bias: bool = True
  rotary: Optional[Tuple[int, ...]] = None
  implementation: str = "auto"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, context, temb):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    text_len = context.shape[1]
    h, c, gate, c_gate = LayerNormZero(self.eps, self.affine, **kw, name="norm1")(x, context, temb)
    video_out, text_out = Attention(self.heads, self.head_dim, self.bias, self.rotary, self.implementation, **kw,
                                    name="attn1")(h, c)
    x, context = x + gate * video_out, context + c_gate * text_out
    h, c, gate, c_gate = LayerNormZero(self.eps, self.affine, **kw, name="norm2")(x, context, temb)
    ff = FeedForward("gelu-approximate", **kw, name="ff")(jnp.concatenate([c, h], axis=1))
    return x + gate * ff[:, text_len:], context + c_gate * ff[:, :text_len]


class AdaLayerNorm(nn.Module):
  """Diffusers' AdaLayerNorm with chunk_dim=1 (norm_out): `linear` of SiLU(temb) to (shift, scale), in that
  order, then `norm`(x) * (1 + scale) + shift."""
  eps: float
  affine: bool
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, temb):
    emb = _dense(self, 2 * x.shape[-1], ("embed", "mlp"), "linear")(nn.silu(temb))
    shift, scale = jnp.split(emb[:, None, :], 2, axis=-1)
    return _layer_norm(self, self.eps, self.affine, "norm")(x) * (1 + scale) + shift


class CogVideoXTransformer3DModel(nn.Module):
  """Diffusers' CogVideoXTransformer3DModel for the configs `CogVideoXConfig` accepts.

  __call__(hidden_states (B, F, C, H, W) latent frames, timestep (B,) or scalar (int or float),
           encoder_hidden_states (B, L, text_embed_dim), num_steps (B,) ints with num_step_embeds)
  -> (B, F, out_channels, H, W), the input's layout. H and W must be multiples of patch_size; any
  frame count and caption length. Position tables (sin-cos or rotary) are computed for the actual
  latent. Computed in `dtype`; `remat` rematerialises each block; `attention_implementation` goes to
  `models.attention.attention`.
  """
  config: CogVideoXConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_implementation: str = "auto"
  remat: bool = False

  @nn.compact
  def __call__(self, hidden_states, timestep, encoder_hidden_states, num_steps=None):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    p, out_channels = cfg.patch_size, cfg.out_channels
    video = jnp.asarray(hidden_states)
    if video.ndim != 5 or video.shape[2] != cfg.in_channels:
      raise ValueError(f"hidden_states must be (batch, frames, in_channels={cfg.in_channels}, height, width), "
                       f"got {video.shape}")
    batch, frames, _, height, width = video.shape
    if height % p or width % p:
      raise ValueError(f"hidden_states height and width ({height}, {width}) must be multiples of patch_size={p}")
    grid_h, grid_w = height // p, width // p
    text = jnp.asarray(encoder_hidden_states).astype(self.dtype)
    if text.ndim != 3 or text.shape[0] != batch or text.shape[2] != cfg.text_embed_dim:
      raise ValueError(f"encoder_hidden_states must be (batch={batch}, length, text_embed_dim={cfg.text_embed_dim}),"
                       f" got {text.shape}")

    t = jnp.broadcast_to(jnp.asarray(timestep).reshape(-1), (batch,))
    sinusoid = timestep_embedding(t, cfg.inner_dim, cfg.flip_sin_to_cos, cfg.freq_shift).astype(self.dtype)
    temb = TimestepEmbedding(cfg.time_embed_dim, **kw, name="time_embedding")(sinusoid)
    if cfg.num_step_embeds is not None:
      if num_steps is None:
        raise ValueError(f"this model has num_step_embeds={cfg.num_step_embeds}: pass num_steps (B,)")
      steps = jnp.broadcast_to(jnp.asarray(num_steps, jnp.int32).reshape(-1), (batch,))
      table = nn.Embed(cfg.num_step_embeds, cfg.time_embed_dim, **kw, name="step_embedding",
                       embedding_init=layers.annotated(nn.initializers.zeros, ("classes", "embed")))
      temb = temb + table(steps)

    x = jnp.transpose(video, (0, 1, 3, 4, 2)).astype(self.dtype)
    context, x = PatchEmbed(cfg, **kw, name="patch_embed")(text, x)

    rotary = None
    if cfg.use_rotary_positional_embeddings:
      rotary = (frames, grid_h, grid_w) + cfg.rotary_base_grid
    for i in range(cfg.num_layers):
      block = CogVideoXBlock(cfg.num_attention_heads, cfg.attention_head_dim, cfg.norm_eps,
                             cfg.norm_elementwise_affine, cfg.attention_bias, rotary, self.attention_implementation,
                             **kw, name=f"transformer_blocks_{i}")
      x, context = rematerialised(block, x, context, temb) if self.remat else block(x, context, temb)

    x = _layer_norm(self, cfg.norm_eps, cfg.norm_elementwise_affine, "norm_final")(x)
    x = AdaLayerNorm(cfg.norm_eps, cfg.norm_elementwise_affine, **kw, name="norm_out")(x, temb)
    x = _dense(self, p * p * out_channels, ("embed", "mlp"), "proj_out")(x)
    x = x.reshape(batch, frames, grid_h, grid_w, out_channels, p, p)
    return jnp.einsum("bfhwcpq->bfchpwq", x).reshape(batch, frames, out_channels, height, width)
