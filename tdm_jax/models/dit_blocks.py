"""The 2-D sin-cos position table Diffusers' DiTs share (PixArt, SD3's MMDiT), as Diffusers computes it.
(Their GELU-tanh feed-forward is `blocks.FeedForward(activation="gelu-approximate")`.)"""

from __future__ import annotations

import numpy as np


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
