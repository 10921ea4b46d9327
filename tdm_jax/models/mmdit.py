"""SD3Transformer2DModel (SD3-Medium, SD3.5-Medium, SD3.5-Large: the "MMDiT") in Flax linen, equal to Diffusers'.

An MMDiT keeps two token streams, the image patches and the projected text, each with its own
weights (adaLN-Zero modulation, q/k/v, output projection, feed-forward), and lets them meet in one
joint attention over the concatenated [image, text] sequence. Each block is modulated by one
conditioning vector: the embedded timestep plus the projected pooled text embedding. SD3.5 adds an
RMS norm of queries and keys per head (`qk_norm="rms_norm"`) and, in SD3.5-Medium's first blocks, a
second image-only self-attention (`attn2`) modulated by three more rows (`dual_attention_layers`).
The last block only reads the text stream (`context_pre_only`): no text output projection and no
text feed-forward.

Module names mirror Diffusers' state-dict names (`transformer_blocks_3/attn/add_k_proj` for
`transformer_blocks.3.attn.add_k_proj`), so `tdm_jax/convert/mmdit.py` is a renaming plus layouts.
Blocks are unrolled (named modules, not a scan) so names and LoRA regexes stay per block. The
position table is not a parameter: Diffusers' persistent `pos_embed.pos_embed` buffer is the fixed
sin-cos table of `pos_embed_max_size`^2 positions, which we compute (only the crop a latent reads).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tdm_jax.infra.errors import ConfigError
from tdm_jax.models import layers
from tdm_jax.models.attention import attention
from tdm_jax.models.blocks import dense as _dense
from tdm_jax.models.blocks import FeedForward
from tdm_jax.models.embeddings import TimestepEmbedding, sincos_1d, sincos_pos_embed, timestep_embedding
from tdm_jax.models.remat import rematerialised

# Every argument of Diffusers' SD3Transformer2DModel.__init__; any other key (bar "_name" keys and
# ours, `num_step_embeds`) is refused rather than silently ignored.
DIFFUSERS_KEYS = (
    "sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim", "num_attention_heads",
    "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim", "out_channels", "pos_embed_max_size",
    "dual_attention_layers", "qk_norm")

QK_NORMS = (None, "rms_norm")  # what SD3 (None) and SD3.5 ("rms_norm") use
SINUSOID_CHANNELS = 256  # Diffusers' Timesteps(num_channels=256, flip_sin_to_cos=True, downscale_freq_shift=0)
NORM_EPS = 1e-6  # every LayerNorm of the model (adaLN-Zero, norm2, norm_out) and the QK RMS norms
INTERPOLATION_SCALE = 1  # Diffusers' PatchEmbed default, which SD3Transformer2DModel keeps


def _unsupported(key, value, supported):
  return ConfigError(f"mmdit config: unsupported {key}={value!r}; supported: {supported}")


@dataclasses.dataclass(frozen=True)
class MMDiTConfig:
  """Diffusers' SD3Transformer2DModel config with its defaults (resolved as Diffusers resolves them).

  `dual_attention_layers` is kept as a tuple; `out_channels=None` means in_channels, as in Diffusers.
  `num_step_embeds` is ours: a (K, inner) table whose row `num_steps` is added to the timestep
  embedding (TDM's unified student).
  """
  sample_size: int = 128
  patch_size: int = 2
  in_channels: int = 16
  num_layers: int = 18
  attention_head_dim: int = 64
  num_attention_heads: int = 18
  joint_attention_dim: int = 4096
  caption_projection_dim: int = 1152
  pooled_projection_dim: int = 2048
  out_channels: Optional[int] = 16
  pos_embed_max_size: Optional[int] = 96
  dual_attention_layers: Tuple[int, ...] = ()
  qk_norm: Optional[str] = None
  num_step_embeds: Optional[int] = None

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "MMDiTConfig":
    """From a Diffusers transformer config.json dict; unknown keys are refused (bar "_" ones)."""
    known = set(DIFFUSERS_KEYS) | {"num_step_embeds"}
    for key in d:
      if not key.startswith("_") and key not in known:
        raise ConfigError(f"mmdit config: unknown key {key!r}: not an argument of Diffusers' "
                          f"SD3Transformer2DModel; remove it (keys starting with '_' are ignored)")
    return cls(**{k: v for k, v in d.items() if k in known})

  def __post_init__(self):
    if self.qk_norm not in QK_NORMS:
      raise _unsupported("qk_norm", self.qk_norm, list(QK_NORMS))
    layers_ = self.dual_attention_layers
    if layers_ is None or isinstance(layers_, (str, bytes)) or not all(
        isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in layers_):
      raise _unsupported("dual_attention_layers", layers_, "a list of block indices (ints)")
    layers_ = tuple(int(i) for i in layers_)
    if any(not 0 <= i < self.num_layers for i in layers_):
      raise _unsupported("dual_attention_layers", list(layers_),
                         f"indices of the num_layers={self.num_layers} blocks, 0..{self.num_layers - 1}")
    object.__setattr__(self, "dual_attention_layers", layers_)
    if self.caption_projection_dim != self.inner_dim:
      raise _unsupported("caption_projection_dim", self.caption_projection_dim,
                         f"num_attention_heads * attention_head_dim = {self.inner_dim} (the blocks' text width)")
    if self.inner_dim % 4:
      raise ConfigError(f"mmdit config: inner dim {self.inner_dim} (heads x head dim) must be divisible by 4 "
                        "for the 2-D sin-cos position table")
    if self.pos_embed_max_size is not None and self.pos_embed_max_size < 1:
      raise _unsupported("pos_embed_max_size", self.pos_embed_max_size, "None or a positive int")
    if self.num_step_embeds is not None and self.num_step_embeds < 1:
      raise _unsupported("num_step_embeds", self.num_step_embeds, "None or a positive int")
    if self.out_channels is None:  # Diffusers' resolution, done once here
      object.__setattr__(self, "out_channels", self.in_channels)

  @property
  def inner_dim(self) -> int:
    return self.num_attention_heads * self.attention_head_dim

  @property
  def base_size(self) -> int:
    """Diffusers' PatchEmbed `base_size`: the position grid the table's positions are scaled to."""
    return self.sample_size // self.patch_size


def axis_embedding(embed_dim: int, max_size: int, base_size: int) -> np.ndarray:
  """(max_size, embed_dim // 2) float64: one axis's half of Diffusers' (max_size^2, embed_dim) sin-cos
  table, whose entry for (row r, column c) is concat(axis[c], axis[r]) (the first half encodes the
  column; the grid is square, so both axes share this array). Positions in float32, as Diffusers
  makes them."""
  pos = np.arange(max_size, dtype=np.float32) / np.float32(max_size / base_size) / np.float32(INTERPOLATION_SCALE)
  return sincos_1d(embed_dim // 2, pos)


def cropped_pos_embed(embed_dim: int, max_size: int, base_size: int, grid_h: int, grid_w: int) -> np.ndarray:
  """Diffusers' PatchEmbed.cropped_pos_embed: the centre (grid_h, grid_w) crop of the sin-cos table of
  max_size x max_size positions, (grid_h * grid_w, embed_dim) float32, tokens in row-major order.

  Only the crop is computed (the table is separable in rows and columns), with Diffusers' values.
  """
  if grid_h > max_size or grid_w > max_size:
    raise ValueError(f"latent grid {grid_h} x {grid_w} patches is larger than the position table "
                     f"(pos_embed_max_size={max_size}): at most {max_size} patches a side")
  top, left = (max_size - grid_h) // 2, (max_size - grid_w) // 2
  axis = axis_embedding(embed_dim, max_size, base_size)
  cols = np.broadcast_to(axis[None, left:left + grid_w], (grid_h, grid_w, embed_dim // 2))
  rows = np.broadcast_to(axis[top:top + grid_h, None], (grid_h, grid_w, embed_dim // 2))
  return np.concatenate([cols, rows], axis=-1).reshape(grid_h * grid_w, embed_dim).astype(np.float32)


def pos_table(config: MMDiTConfig, grid_h: int, grid_w: int) -> np.ndarray:
  """The position embedding of a (grid_h, grid_w)-patch latent: the crop of the max-size table, or (no
  `pos_embed_max_size`) the table of that grid itself, as Diffusers' PatchEmbed has them."""
  if config.pos_embed_max_size is None:
    return sincos_pos_embed(config.inner_dim, grid_h, grid_w, config.base_size, INTERPOLATION_SCALE)
  return cropped_pos_embed(config.inner_dim, config.pos_embed_max_size, config.base_size, grid_h, grid_w)


def _layer_norm(m: nn.Module):
  """LayerNorm without affine parameters (eps 1e-6); float32 statistics (Flax's) in any compute dtype."""
  return nn.LayerNorm(epsilon=NORM_EPS, use_scale=False, use_bias=False, use_fast_variance=False, dtype=m.dtype,
                      param_dtype=m.param_dtype)


class RMSNorm(nn.Module):
  """Diffusers' RMSNorm with a weight (`scale`, ours) over the last axis: statistics in float32."""
  eps: float = NORM_EPS
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", layers.annotated(nn.initializers.ones, layers.NORM_AXES), (x.shape[-1],),
                       self.param_dtype)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (x32 * scale.astype(jnp.float32)).astype(self.dtype)


class PatchEmbed(nn.Module):
  """Conv with kernel = stride = patch (`proj`), tokens in row-major order, + the position table."""
  config: MMDiTConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    p = self.config.patch_size
    x = layers.conv(self.config.inner_dim, "proj", dtype=self.dtype, param_dtype=self.param_dtype, kernel=p,
                    stride=p, padding=((0, 0), (0, 0)))(x)
    b, gh, gw, d = x.shape
    table = pos_table(self.config, gh, gw)
    return (x.reshape(b, gh * gw, d).astype(jnp.float32) + table[None]).astype(self.dtype)


class PooledTextProjection(nn.Module):
  """PixArtAlphaTextProjection with act_fn="silu": linear_1, SiLU, linear_2."""
  features: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = _dense(self, self.features, ("cross_embed", "mlp"), "linear_1")(x)
    return _dense(self, self.features, ("mlp", "embed"), "linear_2")(nn.silu(x))


class CombinedTimestepTextProjEmbeddings(nn.Module):
  """timestep_embedder(sinusoids of t) [+ our step-count row] + text_embedder(pooled text)."""
  dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, timesteps, pooled, step_row=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    sinusoid = timestep_embedding(timesteps, SINUSOID_CHANNELS, True, 0).astype(self.dtype)
    emb = TimestepEmbedding(self.dim, **kw, name="timestep_embedder")(sinusoid)
    if step_row is not None:
      emb = emb + step_row
    return emb + PooledTextProjection(self.dim, **kw, name="text_embedder")(pooled)


class AdaLayerNormZero(nn.Module):
  """SiLU + `linear` of the conditioning to `rows` modulation rows, and the plain LayerNorm of x.

  rows=6: Diffusers' AdaLayerNormZero (shift, scale, gate of attention; shift, scale, gate of the
  feed-forward); rows=9: SD35AdaLayerNormZeroX (+ shift, scale, gate of `attn2`). Returns (LayerNorm(x),
  the rows as (batch, 1, dim) each); the caller modulates.
  """
  rows: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, temb):
    dim = x.shape[-1]
    emb = _dense(self, self.rows * dim, ("embed", "mlp"), "linear")(nn.silu(temb))
    return _layer_norm(self)(x), jnp.split(emb[:, None, :], self.rows, axis=-1)


class AdaLayerNormContinuous(nn.Module):
  """Diffusers' AdaLayerNormContinuous (elementwise_affine=False, eps 1e-6): `linear` of SiLU(cond) to
  (scale, shift), in that order, then LayerNorm(x) * (1 + scale) + shift."""
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, cond):
    dim = x.shape[-1]
    emb = _dense(self, 2 * dim, ("embed", "mlp"), "linear")(nn.silu(cond))
    scale, shift = jnp.split(emb[:, None, :], 2, axis=-1)
    return _layer_norm(self)(x) * (1 + scale) + shift


class JointAttention(nn.Module):
  """Diffusers' Attention with JointAttnProcessor2_0.

  Image stream: to_q/to_k/to_v (bias), optional RMS norm_q/norm_k per head. With `context` (the
  joint `attn`): add_q_proj/add_k_proj/add_v_proj (bias) and norm_added_q/norm_added_k; queries, keys
  and values are concatenated [image, context] along the sequence, the output split back: the image
  part through to_out_0, the context part through to_add_out (absent with context_pre_only, which
  returns the image part only). Without context (`attn2`): plain self-attention, to_out_0.
  """
  heads: int
  head_dim: int
  qk_norm: Optional[str] = None
  context_pre_only: bool = False
  implementation: str = "auto"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def _qkv(self, x, names, norm_names):
    inner = self.heads * self.head_dim
    split = lambda a: a.reshape(a.shape[:2] + (self.heads, self.head_dim))
    q, k, v = (split(_dense(self, inner, ("embed", "heads"), n)(x)) for n in names)
    if self.qk_norm == "rms_norm":
      kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
      q = RMSNorm(**kw, name=norm_names[0])(q)
      k = RMSNorm(**kw, name=norm_names[1])(k)
    return q, k, v

  @nn.compact
  def __call__(self, x, context=None):
    inner = self.heads * self.head_dim
    dim = x.shape[-1]
    q, k, v = self._qkv(x, ("to_q", "to_k", "to_v"), ("norm_q", "norm_k"))
    if context is not None:
      cq, ck, cv = self._qkv(context, ("add_q_proj", "add_k_proj", "add_v_proj"), ("norm_added_q", "norm_added_k"))
      q, k, v = (jnp.concatenate(pair, axis=1) for pair in ((q, cq), (k, ck), (v, cv)))
    out = attention(q, k, v, implementation=self.implementation)
    out = out.reshape(out.shape[:2] + (inner,))
    image = _dense(self, dim, ("heads", "embed"), "to_out_0")(out[:, :x.shape[1]])
    if context is None or self.context_pre_only:
      return image
    return image, _dense(self, context.shape[-1], ("heads", "embed"), "to_add_out")(out[:, x.shape[1]:])


class JointTransformerBlock(nn.Module):
  """Diffusers' JointTransformerBlock: (x, context, temb) -> (x, context), or x alone with context_pre_only.

  Image: adaLN-Zero (SD35AdaLayerNormZeroX with dual attention) -> joint attention, gated residual;
  [dual: `attn2` on the second modulation of the same LayerNorm(x), gated residual;] LayerNorm(x)
  modulated -> ff, gated residual. Context: adaLN-Zero (AdaLayerNormContinuous in the last block) ->
  the joint attention's context half, gated residual; LayerNorm modulated -> ff_context, gated
  residual (neither in the last block).
  """
  heads: int
  head_dim: int
  context_pre_only: bool = False
  dual_attention: bool = False
  qk_norm: Optional[str] = None
  implementation: str = "auto"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, context, temb):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attn_kw = dict(heads=self.heads, head_dim=self.head_dim, qk_norm=self.qk_norm,
                   implementation=self.implementation, **kw)
    normed, mod = AdaLayerNormZero(9 if self.dual_attention else 6, **kw, name="norm1")(x, temb)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod[:6]
    h = normed * (1 + scale_msa) + shift_msa
    if self.context_pre_only:
      c = AdaLayerNormContinuous(**kw, name="norm1_context")(context, temb)
    else:
      c_normed, c_mod = AdaLayerNormZero(6, **kw, name="norm1_context")(context, temb)
      c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = c_mod
      c = c_normed * (1 + c_scale_msa) + c_shift_msa

    out = JointAttention(**attn_kw, context_pre_only=self.context_pre_only, name="attn")(h, c)
    image_out, context_out = (out, None) if self.context_pre_only else out
    x = x + gate_msa * image_out
    if self.dual_attention:
      shift_msa2, scale_msa2, gate_msa2 = mod[6:]
      x = x + gate_msa2 * JointAttention(**attn_kw, name="attn2")(normed * (1 + scale_msa2) + shift_msa2)
    h = _layer_norm(self)(x) * (1 + scale_mlp) + shift_mlp
    x = x + gate_mlp * FeedForward("gelu-approximate", **kw, name="ff")(h)
    if self.context_pre_only:
      return x

    context = context + c_gate_msa * context_out
    c = _layer_norm(self)(context) * (1 + c_scale_mlp) + c_shift_mlp
    return x, context + c_gate_mlp * FeedForward("gelu-approximate", **kw, name="ff_context")(c)


class SD3Transformer2DModel(nn.Module):
  """Diffusers' SD3Transformer2DModel for the configs `MMDiTConfig` accepts.

  __call__(sample (B, C, H, W), timestep (B,) or scalar, float (Diffusers' 1000 * sigma),
           encoder_hidden_states (B, L, joint_attention_dim), pooled_projections (B, pooled_projection_dim),
           num_steps (B,) ints with num_step_embeds)
  -> (B, out_channels, H, W). H and W must be multiples of patch_size, and the patch grid at most
  pos_embed_max_size a side (the centre crop of the position table is used, non-square too).
  Computed in `dtype`; `remat` rematerialises each transformer block.
  """
  config: MMDiTConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_implementation: str = "auto"
  remat: bool = False

  @nn.compact
  def __call__(self, sample, timestep, encoder_hidden_states, pooled_projections, num_steps=None):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    dim, p, out_channels = cfg.inner_dim, cfg.patch_size, cfg.out_channels
    x = jnp.transpose(jnp.asarray(sample), (0, 2, 3, 1)).astype(self.dtype)
    batch, height, width, _ = x.shape
    if height % p or width % p:
      raise ValueError(f"sample height and width ({height}, {width}) must be multiples of patch_size={p}")
    grid_h, grid_w = height // p, width // p
    if cfg.pos_embed_max_size is not None and max(grid_h, grid_w) > cfg.pos_embed_max_size:
      raise ValueError(f"sample {height} x {width} is {grid_h} x {grid_w} patches, larger than the position "
                       f"table (pos_embed_max_size={cfg.pos_embed_max_size} patches a side, "
                       f"{cfg.pos_embed_max_size * p} latent pixels)")
    x = PatchEmbed(cfg, **kw, name="pos_embed")(x)

    t = jnp.broadcast_to(jnp.asarray(timestep).reshape(-1), (batch,))
    step_row = None
    if cfg.num_step_embeds is not None:
      if num_steps is None:
        raise ValueError(f"this model has num_step_embeds={cfg.num_step_embeds}: pass num_steps (B,)")
      steps = jnp.broadcast_to(jnp.asarray(num_steps, jnp.int32).reshape(-1), (batch,))
      table = nn.Embed(cfg.num_step_embeds, dim, **kw, name="step_embedding",
                       embedding_init=layers.annotated(nn.initializers.zeros, ("classes", "embed")))
      step_row = table(steps)
    pooled = jnp.asarray(pooled_projections).astype(self.dtype)
    if pooled.shape != (batch, cfg.pooled_projection_dim):
      raise ValueError(f"pooled_projections must be (batch, pooled_projection_dim) = "
                       f"{(batch, cfg.pooled_projection_dim)}, got {pooled.shape}")
    temb = CombinedTimestepTextProjEmbeddings(dim, **kw, name="time_text_embed")(t, pooled, step_row)
    context = _dense(self, cfg.caption_projection_dim, ("cross_embed", "embed"), "context_embedder")(
        jnp.asarray(encoder_hidden_states).astype(self.dtype))

    for i in range(cfg.num_layers):
      last = i == cfg.num_layers - 1
      block = JointTransformerBlock(cfg.num_attention_heads, cfg.attention_head_dim, context_pre_only=last,
                                    dual_attention=i in cfg.dual_attention_layers, qk_norm=cfg.qk_norm,
                                    implementation=self.attention_implementation, **kw,
                                    name=f"transformer_blocks_{i}")
      out = rematerialised(block, x, context, temb) if self.remat else block(x, context, temb)
      if last:
        x = out
      else:
        x, context = out

    x = AdaLayerNormContinuous(**kw, name="norm_out")(x, temb)
    x = _dense(self, p * p * out_channels, ("embed", "mlp"), "proj_out")(x)
    x = x.reshape(batch, grid_h, grid_w, p, p, out_channels)
    return jnp.einsum("nhwpqc->nchpwq", x).reshape(batch, out_channels, height, width)
