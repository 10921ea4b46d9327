"""Videos a person can watch: decoded clips as uint8 frames, MP4 files and animated labelled grids.

MP4 goes through Diffusers' `export_to_video` (imageio with its ffmpeg); animated grids (GIF, or WebP by
the path's suffix) through Pillow, one labelled grid picture per frame (`sample.labelled_grid`), so a
reader sees each sampler's row move side by side and can tell which row is which.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import jax
import numpy as np

from tdm_jax.core import sample

FPS = 8  # CogVideoX's clips are 8 frames per second


def to_uint8(video) -> np.ndarray:
  """Clips in [-1, 1], (B, F, C, H, W) as the video pipelines lay them out -> uint8 (B, F, H, W, C)."""
  x = np.asarray(jax.device_get(video), np.float32)
  if x.ndim != 5:
    raise ValueError(f"video must be (batch, frames, channels, height, width), got shape {x.shape}")
  return np.clip(np.round((x.transpose(0, 1, 3, 4, 2) + 1.0) * 127.5), 0, 255).astype(np.uint8)


MP4_BLOCK = 16  # imageio's ffmpeg macro_block_size: frame sides a multiple of it are written as they are


def write_mp4(frames, path: str, fps: int = FPS, upscale: int = 1) -> str:
  """One clip, uint8 (F, H, W, 3), as an MP4 file (nearest-neighbour upscaled, then padded white at the bottom
  and right to a multiple of 16 pixels: imageio's ffmpeg writer would otherwise resize the frames to one)."""
  from diffusers.utils import export_to_video  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  frames = np.asarray(frames)
  if upscale > 1:
    frames = frames.repeat(upscale, axis=1).repeat(upscale, axis=2)
  h, w = frames.shape[1:3]
  frames = np.pad(frames, ((0, 0), (0, -h % MP4_BLOCK), (0, -w % MP4_BLOCK), (0, 0)), constant_values=255)
  return export_to_video([Image.fromarray(f) for f in frames], path, fps=fps)


def grid_frames(clips, columns: int, pad: int = 0) -> np.ndarray:
  """uint8 (N, F, H, W, 3) clips tiled `columns` wide, row-major, per frame: (F, H', W', 3)."""
  clips = np.asarray(clips)
  n, f, h, w, c = clips.shape
  rows = -(-n // columns)
  out = np.full((f, rows * (h + pad) - pad, columns * (w + pad) - pad, c), 255, np.uint8)
  for i, clip in enumerate(clips):
    r, col = divmod(i, columns)
    out[:, r * (h + pad):r * (h + pad) + h, col * (w + pad):col * (w + pad) + w] = clip
  return out


def write_labelled_animation(rows: Sequence[Tuple[str, np.ndarray]], path: str, fps: int = FPS, upscale: int = 1,
                             pad: int = 0) -> str:
  """An animated grid (GIF or WebP, by `path`'s suffix) with one row per (label, uint8 (N, F, H, W, 3)
  clips) pair and the label to its left; every row must have the same frame count. Loops forever."""
  rows = [(label, np.asarray(clips)) for label, clips in rows]
  frames = {clips.shape[1] for _, clips in rows}
  if len(frames) != 1:
    raise ValueError(f"every row of an animated grid needs the same frame count, got {sorted(frames)}")
  pictures = [sample.labelled_grid([(label, clips[:, t]) for label, clips in rows], upscale, pad)
              for t in range(frames.pop())]
  pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=int(1000 / fps), loop=0)
  return path
