"""The resnet, attention, upsampling and feed-forward blocks that the UNet, the VAE and the DiTs share.

Diffusers builds both models from the same ResnetBlock2D, Attention and Upsample2D; so do we,
with the same parameter names (norm1/conv1/time_emb_proj/norm2/conv2/conv_shortcut,
to_q/to_k/to_v/to_out_0, conv), so one converter rule covers both models. The VAE's resnets have
no time embedding and its mid-block attention is one head with biased projections.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from tdm_jax.models import layers
from tdm_jax.models.attention import attention


def dense(m: nn.Module, features, axes, name, use_bias=True):
  """An annotated Dense layer in module `m`'s dtypes (as are the makers below)."""
  return layers.dense(features, axes, name, dtype=m.dtype, param_dtype=m.param_dtype, use_bias=use_bias)


def conv(m: nn.Module, features, name, kernel=3, stride=1):
  return layers.conv(features, name, dtype=m.dtype, param_dtype=m.param_dtype, kernel=kernel, stride=stride)


def group_norm(m: nn.Module, groups, eps, name):
  return layers.group_norm(groups, eps, name, dtype=m.dtype, param_dtype=m.param_dtype)


class ResnetBlock2D(nn.Module):
  """GroupNorm-SiLU-conv, [+ projected time embedding], GroupNorm-SiLU-conv, + (1x1-conv) shortcut.

  `temb=None` is the VAE's block (no `time_emb_proj`)."""
  out_channels: int
  groups: int = 32
  eps: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, temb: Optional[jax.Array] = None):
    h = nn.silu(group_norm(self, self.groups, self.eps, "norm1")(x))
    h = conv(self, self.out_channels, "conv1")(h)
    if temb is not None:
      h = h + dense(self, self.out_channels, ("embed", "mlp"), "time_emb_proj")(nn.silu(temb))[:, None, None, :]
    h = nn.silu(group_norm(self, self.groups, self.eps, "norm2")(h))
    h = conv(self, self.out_channels, "conv2")(h)
    if x.shape[-1] != self.out_channels:
      x = conv(self, self.out_channels, "conv_shortcut", kernel=1)(x)
    return x + h


class Attention(nn.Module):
  """Multi-head attention: to_q/to_k/to_v, to_out_0 (with bias), as Diffusers' Attention.

  The UNet's projections have no bias (`qkv_bias=False`) and its cross-attention reads keys and
  values from the text context. The VAE's mid-block attention is one head with biases over the
  pixels of an NHWC input, GroupNorm first (`norm_groups`) and a residual connection."""
  heads: int
  head_dim: int
  cross: bool = False
  qkv_bias: bool = False
  norm_groups: Optional[int] = None
  norm_eps: float = 1e-6
  residual: bool = False
  implementation: str = "auto"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, context=None):
    inputs = x
    if self.norm_groups:
      x = group_norm(self, self.norm_groups, self.norm_eps, "group_norm")(x)
    if x.ndim == 4:  # pixels as tokens
      x = x.reshape(x.shape[0], -1, x.shape[-1])
    inner = self.heads * self.head_dim
    context = x if context is None else context
    kv_axes = ("cross_embed", "heads") if self.cross else ("embed", "heads")
    q = dense(self, inner, ("embed", "heads"), "to_q", use_bias=self.qkv_bias)(x)
    k = dense(self, inner, kv_axes, "to_k", use_bias=self.qkv_bias)(context)
    v = dense(self, inner, kv_axes, "to_v", use_bias=self.qkv_bias)(context)
    split = lambda a: a.reshape(a.shape[:2] + (self.heads, self.head_dim))
    out = attention(split(q), split(k), split(v), implementation=self.implementation)
    out = out.reshape(out.shape[:2] + (inner,))
    out = dense(self, x.shape[-1], ("heads", "embed"), "to_out_0")(out).reshape(inputs.shape)
    return inputs + out if self.residual else out


class Upsample2D(nn.Module):
  """Nearest-neighbour 2x, then a 3x3 conv."""
  channels: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return conv(self, self.channels, "conv")(x)


class GEGLU(nn.Module):
  """proj to 2*inner, split into (hidden, gate), hidden * gelu(gate) (exact gelu)."""
  inner: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = dense(self, 2 * self.inner, ("embed", "mlp"), "proj")(x)
    hidden, gate = jnp.split(h, 2, axis=-1)
    return hidden * nn.gelu(gate, approximate=False)


class GELU(nn.Module):
  """Diffusers' GELU activation module: `proj`, then tanh-approximate GELU."""
  inner: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    return nn.gelu(dense(self, self.inner, ("embed", "mlp"), "proj")(x), approximate=True)


FEED_FORWARD_ACTIVATIONS = {"geglu": GEGLU, "gelu-approximate": GELU}


class FeedForward(nn.Module):
  """Diffusers' FeedForward: net_0 (the activation module, to 4 * dim), net_2 back to dim. "geglu" in the
  UNets' transformer blocks, "gelu-approximate" in PixArt's and SD3's."""
  activation: str = "geglu"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    dim = x.shape[-1]
    act = FEED_FORWARD_ACTIVATIONS[self.activation]
    h = act(4 * dim, dtype=self.dtype, param_dtype=self.param_dtype, name="net_0")(x)
    return dense(self, dim, ("mlp", "embed"), "net_2")(h)
