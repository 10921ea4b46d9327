"""The pieces Diffusers' DiTs share (PixArt, SD3's MMDiT): the 2-D sin-cos position table and the
GELU-tanh feed-forward, with Diffusers' parameter names (`net_0/proj`, `net_2`) so that every
transformer family's converter maps them by the same rule."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from tdm_jax.models.blocks import dense as _dense


def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
  """Diffusers' `get_1d_sincos_pos_embed_from_grid`: float64 (len(pos), dim), sines then cosines."""
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  out = np.outer(pos.astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_pos_embed(embed_dim: int, grid_h: int, grid_w: int, base_size: int,
                     interpolation_scale: float) -> np.ndarray:
  """Diffusers' `get_2d_sincos_pos_embed` for a (grid_h, grid_w) grid: (grid_h * grid_w, embed_dim) float32.

  Positions in float32 as Diffusers makes them, sinusoids in float64, then float32; the first half
  encodes the column (width) position, the second the row. A numpy constant: float32 sines of
  positions up to ~64 would be off by ~4e-6.
  """
  def positions(n):
    return np.arange(n, dtype=np.float32) / np.float32(n / base_size) / np.float32(interpolation_scale)

  cols = np.broadcast_to(positions(grid_w)[None, :], (grid_h, grid_w)).reshape(-1)
  rows = np.broadcast_to(positions(grid_h)[:, None], (grid_h, grid_w)).reshape(-1)
  return np.concatenate([sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)],
                        axis=1).astype(np.float32)


class GELU(nn.Module):
  """Diffusers' GELU activation module: `proj`, then tanh-approximate GELU."""
  features: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    return nn.gelu(_dense(self, self.features, ("embed", "mlp"), "proj")(x), approximate=True)


class FeedForward(nn.Module):
  """net_0 (GELU tanh to 4 * dim), net_2 back to dim."""
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    dim = x.shape[-1]
    h = GELU(4 * dim, dtype=self.dtype, param_dtype=self.param_dtype, name="net_0")(x)
    return _dense(self, dim, ("mlp", "embed"), "net_2")(h)
