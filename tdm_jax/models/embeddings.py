"""The timestep and position embeddings our denoisers share (UNet, PixArt, SD3's MMDiT, CogVideoX), as
Diffusers computes them.

Timesteps: `timestep_embedding` (sinusoids) and `TimestepEmbedding` (linear_1, SiLU, linear_2).
Positions are fixed tables, no parameters, computed in numpy for the static latent shape at trace
time, in float64 where Diffusers uses float64 and float32 where it uses float32, so that they equal
Diffusers' to the last bit or close: the 2-D sin-cos table of PixArt / SD3 (`sincos_pos_embed`), the
3-D sin-cos table of CogVideoX-2B (`sincos_3d_pos_embed`) and the 3-D rotary table of CogVideoX-5B
(`rotary_3d`, applied by `apply_rotary`). (The DiTs' GELU-tanh feed-forward is
`blocks.FeedForward(activation="gelu-approximate")`.)
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tdm_jax.models.blocks import dense as _dense

ROPE_THETA = 10000.0  # Diffusers' get_3d_rotary_pos_embed default, which CogVideoX keeps


def timestep_embedding(timesteps: jax.Array, dim: int, flip_sin_to_cos: bool,
                       freq_shift: float, max_period: float = 10000.0) -> jax.Array:
  """Diffusers' `get_timestep_embedding`: (N,) -> (N, dim) float32 sinusoids."""
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if flip_sin_to_cos:
    emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedding(nn.Module):
  """[+ cond_proj(condition)] -> linear_1 -> SiLU -> linear_2."""
  features: int
  cond_proj_dim: Optional[int] = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, condition=None):
    if self.cond_proj_dim is not None:
      if condition is None:  # Diffusers skips the projection; adding zeros is the same and keeps the weight
        condition = jnp.zeros(x.shape[:-1] + (self.cond_proj_dim,), self.dtype)
      x = x + _dense(self, x.shape[-1], (None, "embed"), "cond_proj", use_bias=False)(
          jnp.asarray(condition).astype(self.dtype))
    x = _dense(self, self.features, ("embed", "mlp"), "linear_1")(x)
    return _dense(self, self.features, ("mlp", "embed"), "linear_2")(nn.silu(x))


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


def sincos_3d_pos_embed(embed_dim: int, frames: int, grid_h: int, grid_w: int, spatial_scale: float,
                        temporal_scale: float) -> np.ndarray:
  """Diffusers' `get_3d_sincos_pos_embed` as CogVideoXPatchEmbed uses it: (frames * grid_h * grid_w,
  embed_dim) float32, tokens frame-major then row-major.

  Channels: a quarter encodes the frame, then three quarters the 2-D position (half the column, half
  the row). Positions are plain indices over the scales (no base-size normalisation: a larger latent
  reads further positions, Diffusers recomputes the table for each latent size), made in float32,
  sinusoids in float64, then float32.
  """
  if embed_dim % 16:
    raise ValueError(f"the 3-D sin-cos table needs a width divisible by 16, got {embed_dim}")
  spatial, temporal = 3 * embed_dim // 4, embed_dim // 4
  cols = np.arange(grid_w, dtype=np.float32) / np.float32(spatial_scale)
  rows = np.arange(grid_h, dtype=np.float32) / np.float32(spatial_scale)
  times = np.arange(frames, dtype=np.float32) / np.float32(temporal_scale)
  shape = (frames, grid_h, grid_w)
  parts = (sincos_1d(temporal, times)[:, None, None], sincos_1d(spatial // 2, cols)[None, None, :],
           sincos_1d(spatial // 2, rows)[None, :, None])
  table = np.concatenate([np.broadcast_to(p, shape + (p.shape[-1],)) for p in parts], axis=-1)
  return table.reshape(-1, embed_dim).astype(np.float32)


def resize_crop_region(grid_h: int, grid_w: int, base_h: int, base_w: int) -> Tuple[Tuple[int, int], Tuple[int, int]]:
  """CogVideoX pipeline's `get_resize_crop_region_for_grid`: ((top, left), (bottom, right)) of the
  (grid_h, grid_w) grid's aspect fitted into the base (base_h, base_w) grid and centred."""
  if grid_h / grid_w > base_h / base_w:
    height, width = base_h, int(round(base_h / grid_h * grid_w))
  else:
    height, width = int(round(base_w / grid_w * grid_h)), base_w
  top, left = int(round((base_h - height) / 2.0)), int(round((base_w - width) / 2.0))
  return (top, left), (top + height, left + width)


def _linspace_f32(start: float, stop: float, n: int) -> np.ndarray:
  """torch.linspace(start, stop, n, dtype=float32) bit for bit (as torch's CPU kernel computes it: a
  float32 step, then the first half from `start` and the second back from `stop`, each one fused
  multiply-add)."""
  start, stop = np.float32(start), np.float32(stop)
  if n == 1:
    return np.array([start], np.float32)
  step = np.float64(np.float32((stop - start) / np.float32(n - 1)))
  i = np.arange(n, dtype=np.float64)
  return np.where(i < n // 2, np.float64(start) + step * i, np.float64(stop) - step * (n - 1 - i)).astype(np.float32)


def _rotary_1d(dim: int, pos: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """Diffusers' `get_1d_rotary_pos_embed(use_real=True)` in float32: (cos, sin), each (len(pos), dim),
  every frequency's column repeated twice (pairs (2i, 2i + 1) share one angle)."""
  exponent = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
  freqs = np.float32(1.0) / np.power(np.float64(ROPE_THETA), exponent.astype(np.float64)).astype(np.float32)
  angles = np.outer(pos.astype(np.float32), freqs).astype(np.float32)
  return np.repeat(np.cos(angles), 2, axis=1), np.repeat(np.sin(angles), 2, axis=1)


@functools.lru_cache(maxsize=16)
def rotary_3d(head_dim: int, frames: int, grid_h: int, grid_w: int, base_h: int,
              base_w: int) -> Tuple[np.ndarray, np.ndarray]:
  """The (cos, sin) rotary table CogVideoX's pipeline passes its transformer (`_prepare_rotary_positional
  _embeddings`: get_3d_rotary_pos_embed with use_real=True over the latent's grid placed in the crop
  region of the base grid): each (frames * grid_h * grid_w, head_dim) float32, tokens frame-major then
  row-major. Channels: a quarter for the frame, three eighths each for the row and the column.

  Rows and columns are spread by linspace over the crop region of the base grid (base_h x base_w
  patches, the config's sample size over the patch), so a latent of another size keeps the base
  grid's extent; frames are plain indices. Cached: read-only arrays.
  """
  if head_dim % 16:
    raise ValueError(f"the 3-D rotary table needs a head dim divisible by 16, got {head_dim}")
  (top, left), (bottom, right) = resize_crop_region(grid_h, grid_w, base_h, base_w)
  rows = _linspace_f32(top, bottom * (grid_h - 1) / grid_h, grid_h)
  cols = _linspace_f32(left, right * (grid_w - 1) / grid_w, grid_w)
  times = _linspace_f32(0, frames * (frames - 1) / frames, frames)  # = 0, 1, ..., frames - 1
  dim_t, dim_s = head_dim // 4, head_dim // 8 * 3
  shape = (frames, grid_h, grid_w)
  out = []
  for t, r, c in zip(_rotary_1d(dim_t, times), _rotary_1d(dim_s, rows), _rotary_1d(dim_s, cols)):
    parts = (t[:, None, None], r[None, :, None], c[None, None, :])
    table = np.concatenate([np.broadcast_to(p, shape + (p.shape[-1],)) for p in parts], axis=-1)
    table = np.ascontiguousarray(table.reshape(-1, head_dim))
    table.flags.writeable = False
    out.append(table)
  return out[0], out[1]


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Diffusers' `apply_rotary_emb` (use_real=True, unbind dim -1): each pair of channels (2i, 2i + 1)
  rotated by its angle, x * cos + (-x[2i + 1], x[2i]) * sin, in float32; returns x's dtype.
  cos and sin broadcast against x (channels last)."""
  x32 = x.astype(jnp.float32)
  pairs = x32.reshape(x.shape[:-1] + (-1, 2))
  rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
  return (x32 * cos + rotated * sin).astype(x.dtype)
