"""The family seam: latent geometry (image and video), the VAE kinds, the prompt families' lookup and the
exported students' guidance note. Pure host code: no model is built."""

import ml_collections
import pytest

from tdm_jax.convert import folders
from tdm_jax.convert import student as student_io
from tdm_jax.infra.errors import ConfigError
from tdm_jax.tasks.diffusers import backbones, geometry, vaes
from tdm_jax.tasks.diffusers.backbones.pixart import PIXART_ALPHA
from tdm_jax.tasks.diffusers.backbones.unet import SDXL

VIDEO = dict(channels=16, default_size=(480, 720), default_frames=49, spatial_factor=8, temporal_factor=4, patch=2,
             name="cogvideox")
IMAGE = dict(channels=4, default_size=(1024, 1024), default_frames=None, spatial_factor=8, temporal_factor=1,
             patch=2, name="unet")


def _model(**fields):
  return ml_collections.ConfigDict({"resolution": 0, "height": 0, "width": 0, "num_frames": 0, **fields})


def test_video_geometry_defaults_to_the_denoisers_clip():
  g = geometry.from_config(_model(), **VIDEO)
  assert g.video and g.latent_frames == 13 and g.latent_shape == (13, 16, 60, 90)
  assert g.tokens == 17550  # CogVideoX-2B's 49 x 480 x 720 clip
  assert g.image_size == (480, 720) and g.pixel_multiple == 16


def test_video_geometry_from_config_non_square():
  g = geometry.from_config(_model(num_frames=9, height=240, width=368), **VIDEO)
  assert g.latent_shape == (3, 16, 30, 46) and g.tokens == 3 * 15 * 23


@pytest.mark.parametrize("frames", [8, 10, 48])
def test_frames_not_one_plus_4k_are_refused(frames):
  with pytest.raises(ConfigError, match=rf"model.num_frames={frames} must be 1 \+ k x 4"):
    geometry.from_config(_model(num_frames=frames), **VIDEO)


def test_image_geometry_and_its_refusals():
  g = geometry.from_config(_model(resolution=512), **IMAGE)
  assert not g.video and g.latent_shape == (4, 64, 64) and g.tokens == 32 * 32
  assert geometry.from_config(_model(height=512, width=768), **IMAGE).latent_shape == (4, 64, 96)
  with pytest.raises(ConfigError, match="model.resolution=520 must be a positive multiple of 16"):
    geometry.from_config(_model(resolution=520), **IMAGE)
  with pytest.raises(ConfigError, match="model.width=520 must be a positive multiple of 16"):
    geometry.from_config(_model(height=512, width=520), **IMAGE)
  with pytest.raises(ConfigError, match="set both"):
    geometry.from_config(_model(height=512), **IMAGE)
  with pytest.raises(ConfigError, match="model.num_frames=9: the unet denoiser makes images"):
    geometry.from_config(_model(num_frames=9), **IMAGE)


def test_vae_kinds_by_class():
  assert vaes.kind_for("AutoencoderKL").spatial_factor({"block_out_channels": [1, 2, 3, 4]}) == 8
  with pytest.raises(folders.FolderError, match="the pipeline's vae is 'AutoencoderTiny'; supported: AutoencoderKL"):
    vaes.kind_for("AutoencoderTiny")


def test_prompt_families_live_with_their_denoisers():
  assert backbones.pipeline_family("StableDiffusionXLImg2ImgPipeline") is SDXL
  assert backbones.pipeline_family("PixArtAlphaPipeline") is PIXART_ALPHA
  with pytest.raises(ConfigError, match="pipeline class 'KandinskyPipeline'"):
    backbones.pipeline_family("KandinskyPipeline")


def test_guidance_note_follows_the_familys_stock_call():
  """A PixArt (or SD3, CogVideoX) export says to pass guidance_scale=1; only UNets skip guidance themselves."""
  assert "guidance_scale=1.0" in student_io.guidance_note(dict(PIXART_ALPHA.stock_call), flow=False)
  assert "UNet" not in student_io.guidance_note(dict(PIXART_ALPHA.stock_call), flow=False)
  assert "UNet" in student_io.guidance_note(dict(SDXL.stock_call), flow=False)
  assert "sigmas" in student_io.guidance_note({"guidance_scale": 1.0}, flow=True)
