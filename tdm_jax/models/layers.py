"""Layer factories shared by the image models: Diffusers' layer choices plus logical axis names.

Each returns a linen layer whose every parameter is annotated for the sharding rules, so no model
can forget an annotation (conv, dense and norm weights alike).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from tdm_jax.infra import sharding

CONV_AXES = ("conv_height", "conv_width", "conv_in", "conv_out")
NORM_AXES = ("norm",)


def _batch_split_dot_general(*args, **kwargs):
  return sharding.constrain_batch(jax.lax.dot_general(*args, **kwargs))


# nn.Conv's dimension numbers for a 2-D channels-last input and an HWIO kernel.
_NHWC = jax.lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2))
# nn.Conv's dimension numbers for a 3-D channels-last input and a THWIO kernel.
_NTHWC = jax.lax.ConvDimensionNumbers(lhs_spec=(0, 4, 1, 2, 3), rhs_spec=(4, 3, 0, 1, 2), out_spec=(0, 4, 1, 2, 3))
# At most this many output pixels, a CPU conv takes the patch-matrix path (`_patch_conv`).
PATCH_CONV_MAX_PIXELS = 4


def _patch_conv(lhs, rhs, strides, padding, precision):
  """A 2-D NHWC conv as one matmul over its (kh * kw * c_in)-wide patches ("im2col").

  Why: on images of <= 4 output pixels, where a 3x3 kernel mostly reads padding, XLA:CPU's
  convolution is 9-12x slower than this and its gradient ~6x (`benchmarks/conv_ops.py`). That is the
  deepest level of a small UNet (the shapes teacher's 8x8 latents): this path took its forward at
  batch 32 from 55 to 37 ms (`benchmarks/unet_forward.py --unet=shapes`).
  The patch matrix is (B, Ho, Wo, kh * kw * c_in): at <= 4 output pixels, small."""
  kh, kw = rhs.shape[:2]
  x = jnp.pad(lhs, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  ho = (x.shape[1] - kh) // strides[0] + 1
  wo = (x.shape[2] - kw) // strides[1] + 1
  patches = jnp.concatenate(
      [x[:, i:i + strides[0] * (ho - 1) + 1:strides[0], j:j + strides[1] * (wo - 1) + 1:strides[1], :]
       for i in range(kh) for j in range(kw)], axis=-1)
  return jnp.einsum("bhwk,ko->bhwo", patches, rhs.reshape(-1, rhs.shape[-1]), precision=precision)


def _time_split_conv(lhs, rhs, padding, precision):
  """A 3-D (B, T, H, W, C) conv with unit strides as the sum over the kernel's time taps of 2-D convs, the
  clip's frames folded into the batch.

  Why: XLA:CPU's 3-D convolution is 1.6-5x slower than its 2-D one on the same work: at a small CogVideoX
  VAE's sizes (batch 8, 9 frames of 32 x 32, 16 -> 16 channels) 63 ms forward and 232 ms for the gradient,
  against 13 and 68 ms this way (`benchmarks/conv3d_ops.py`)."""
  lhs = jnp.pad(lhs, (tuple(padding[0]),) + ((0, 0),) * 4)
  kt = rhs.shape[0]
  b, t, h, w, c = lhs.shape
  frames = t - kt + 1
  out = None
  for i in range(kt):
    x = lhs[:, i:i + frames].reshape(b * frames, h, w, c)
    y = jax.lax.conv_general_dilated(x, rhs[i], (1, 1), padding[1:], dimension_numbers=_NHWC, precision=precision)
    out = y if out is None else out + y
  return out.reshape((b, frames) + out.shape[1:])


def _conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
          feature_group_count=1, precision=None, **kwargs):
  """lax.conv_general_dilated, or on CPU (decided at trace time, as attention's "auto") `_patch_conv` for
  nn.Conv's plain 2-D convs with at most PATCH_CONV_MAX_PIXELS output pixels and `_time_split_conv` for its
  plain unit-stride 3-D convs."""
  plain = (lhs.ndim == 4 and dimension_numbers == _NHWC and feature_group_count == 1 and not kwargs
           and all(d == 1 for d in (lhs_dilation or ()) + (rhs_dilation or ()))
           and not isinstance(padding, str))
  plain_3d = (lhs.ndim == 5 and dimension_numbers == _NTHWC and feature_group_count == 1 and not kwargs
              and all(d == 1 for d in (lhs_dilation or ()) + (rhs_dilation or ()) + tuple(window_strides))
              and not isinstance(padding, str))
  if plain_3d and jax.default_backend() == "cpu":
    return _time_split_conv(lhs, rhs, padding, precision)
  if plain and jax.default_backend() == "cpu":
    out_pixels = 1
    for size, k, s, (lo, hi) in zip(lhs.shape[1:3], rhs.shape[:2], window_strides, padding):
      out_pixels *= (size + lo + hi - k) // s + 1
    if out_pixels <= PATCH_CONV_MAX_PIXELS:
      return _patch_conv(lhs, rhs, window_strides, padding, precision)
  return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                      rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                      feature_group_count=feature_group_count, precision=precision, **kwargs)


def _batch_split_conv(*args, **kwargs):
  return sharding.constrain_batch(_conv(*args, **kwargs))


# Dense and conv products keep the batch split over the mesh (see `sharding.constrain_batch`):
# with weights split over fsdp, XLA then gathers each weight instead of the activations.
# Passed as the layers' own `dot_general` / `conv_general_dilated` fields, so the layers stay
# plain nn.Dense / nn.Conv (LoRA intercepts their `__call__`).
BATCH_SPLIT_DENSE = dict(dot_general=_batch_split_dot_general)
BATCH_SPLIT_CONV = dict(conv_general_dilated=_batch_split_conv)


def annotated(init, axes: Sequence[Optional[str]]):
  return nn.with_logical_partitioning(init, tuple(axes))


def dense(features: int, axes: Sequence[str], name: str, *, dtype: Any, param_dtype: Any,
          use_bias: bool = True) -> nn.Dense:
  """A Dense layer; `axes` names the kernel's (in, out) axes, the bias takes the out axis."""
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, **BATCH_SPLIT_DENSE,
                  kernel_init=annotated(nn.initializers.lecun_normal(), axes),
                  bias_init=annotated(nn.initializers.zeros, (axes[-1],)), name=name)


def conv(features: int, name: str, *, dtype: Any, param_dtype: Any, kernel: int = 3, stride: int = 1,
         padding: Any = None) -> nn.Conv:
  """A square conv, HWIO kernel; symmetric `kernel // 2` padding unless `padding` is given."""
  if padding is None:
    padding = ((kernel // 2, kernel // 2),) * 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding, dtype=dtype,
                 **BATCH_SPLIT_CONV,
                 param_dtype=param_dtype, kernel_init=annotated(nn.initializers.lecun_normal(), CONV_AXES),
                 bias_init=annotated(nn.initializers.zeros, ("conv_out",)), name=name)


def group_norm(groups: int, eps: float, name: str, *, dtype: Any, param_dtype: Any) -> nn.GroupNorm:
  """GroupNorm with PyTorch's two-pass variance (Diffusers' numerics)."""
  return nn.GroupNorm(num_groups=groups, epsilon=eps, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False,
                      scale_init=annotated(nn.initializers.ones, NORM_AXES),
                      bias_init=annotated(nn.initializers.zeros, NORM_AXES), name=name)


def layer_norm(eps: float, name: str, *, dtype: Any, param_dtype: Any) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False,
                      scale_init=annotated(nn.initializers.ones, NORM_AXES),
                      bias_init=annotated(nn.initializers.zeros, NORM_AXES), name=name)


CONV3D_AXES = ("conv_time", "conv_height", "conv_width", "conv_in", "conv_out")


def conv3d(features: int, name: str, *, dtype: Any, param_dtype: Any, kernel: int = 3,
           padding: Any = None) -> nn.Conv:
  """A cubic 3-D conv over (batch, time, height, width, channels), THWIO kernel.

  Unless `padding` is given, height and width get symmetric `kernel // 2` zero padding and time none:
  video models pad time themselves (causally, from the past only)."""
  if padding is None:
    padding = ((0, 0),) + ((kernel // 2, kernel // 2),) * 2
  return nn.Conv(features, (kernel,) * 3, padding=padding, dtype=dtype, param_dtype=param_dtype,
                 **BATCH_SPLIT_CONV, kernel_init=annotated(nn.initializers.lecun_normal(), CONV3D_AXES),
                 bias_init=annotated(nn.initializers.zeros, ("conv_out",)), name=name)
