"""The latent geometry of a run: which latents its pixels (and frames) make, how many tokens the denoiser
sees, and what sizes the VAE and the denoiser's patches allow.

Images are (C, h, w) latents; video (f, C, h, w), frames first as Diffusers' video transformers take
them, with f = 1 + (F - 1) / temporal factor (a causal video VAE keeps the first frame alone). The token
count is what a flow schedule's dynamic shift reads.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

from tdm_jax.infra.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class LatentGeometry:
  channels: int  # latent channels the denoiser takes
  height: int  # pixels
  width: int
  frames: Optional[int]  # pixel frames per clip; None for images
  spatial_factor: int  # the VAE's pixels per latent along height and width
  temporal_factor: int  # the VAE's frames per latent frame (1: images)
  patch: int  # the denoiser's patch (or total downsampling) along height and width

  @property
  def video(self) -> bool:
    return self.frames is not None

  @property
  def latent_frames(self) -> int:
    return 1 if self.frames is None else 1 + (self.frames - 1) // self.temporal_factor

  @property
  def latent_size(self) -> Tuple[int, int]:
    return self.height // self.spatial_factor, self.width // self.spatial_factor

  @property
  def latent_shape(self) -> tuple:
    """One sample's latents: (C, h, w), or (f, C, h, w) for video."""
    h, w = self.latent_size
    return (self.latent_frames, self.channels, h, w) if self.video else (self.channels, h, w)

  @property
  def tokens(self) -> int:
    """Patches the denoiser sees per sample (every latent frame's)."""
    h, w = self.latent_size
    return self.latent_frames * (h // self.patch) * (w // self.patch)

  @property
  def image_size(self) -> Tuple[int, int]:
    return self.height, self.width

  @property
  def pixel_multiple(self) -> int:
    return self.spatial_factor * self.patch


def from_config(model, *, channels: int, default_size: Tuple[int, int], default_frames: Optional[int],
                spatial_factor: int, temporal_factor: int, patch: int, name: str) -> LatentGeometry:
  """The geometry `model.resolution` / `model.height`, `model.width` / `model.num_frames` ask for (0: the
  denoiser's own `default_size` pixels and `default_frames`), refused before anything compiles unless the
  VAE and the denoiser `name` can make it. Video denoisers have `default_frames`; image ones None."""
  multiple = spatial_factor * patch
  height, width = int(model.get("height", 0) or 0), int(model.get("width", 0) or 0)
  if bool(height) != bool(width):
    raise ConfigError(f"model.height={height} and model.width={width}: set both (a non-square frame) or neither "
                      f"(model.resolution, square)")
  if not height:
    height = width = int(model.get("resolution", 0) or 0)
  if not height:
    height, width = default_size
  for key, value in (("height", height), ("width", width)):
    if value <= 0 or value % multiple:
      what = "resolution" if height == width and not model.get("height") else key
      raise ConfigError(f"model.{what}={value} must be a positive multiple of {multiple} for this pipeline "
                        f"(VAE factor {spatial_factor} x {name} {patch}), e.g. {max(multiple, value // multiple * multiple)}")
  frames = int(model.get("num_frames", 0) or 0)
  if default_frames is None:
    if frames:
      raise ConfigError(f"model.num_frames={frames}: the {name} denoiser makes images, not video; leave it 0")
    return LatentGeometry(channels, height, width, None, spatial_factor, 1, patch)
  frames = frames or int(default_frames)
  if frames < 1 or (frames - 1) % temporal_factor:
    below = 1 + (frames - 1) // temporal_factor * temporal_factor
    raise ConfigError(f"model.num_frames={frames} must be 1 + k x {temporal_factor} (the VAE's temporal "
                      f"compression keeps the first frame alone), e.g. {max(1, below)} or {below + temporal_factor}")
  return LatentGeometry(channels, height, width, frames, spatial_factor, temporal_factor, patch)
