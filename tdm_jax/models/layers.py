"""Layer factories shared by the image models: Diffusers' layer choices plus logical axis names.

Each returns a linen layer whose every parameter is annotated for the sharding rules, so no model
can forget an annotation (conv, dense and norm weights alike).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax

from tdm_jax import sharding

CONV_AXES = ("conv_height", "conv_width", "conv_in", "conv_out")
NORM_AXES = ("norm",)


def _batch_split_dot_general(*args, **kwargs):
  return sharding.constrain_batch(jax.lax.dot_general(*args, **kwargs))


def _batch_split_conv(*args, **kwargs):
  return sharding.constrain_batch(jax.lax.conv_general_dilated(*args, **kwargs))


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
