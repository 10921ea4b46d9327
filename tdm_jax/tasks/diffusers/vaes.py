"""The VAEs a pipeline can hold, by their Diffusers class, as `text_encoders.py` holds the text encoders.

A kind says how its config is read, how its weights convert both ways, how far it compresses space and
time (the latent geometry's factors), and how scaled latents become pixels (evaluation, sampling and
the embedded teachers decode with it; TDM itself is data-free and never decodes in training). A new VAE
kind is one model file, one converter and one entry in `KINDS`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax.numpy as jnp

from tdm_jax.convert import folders
from tdm_jax.convert import vae as vae_io
from tdm_jax.convert import vae_cogvideox as cogvideox_vae_io
from tdm_jax.models import vae_cogvideox
from tdm_jax.models.vae import AutoencoderKL, VAEConfig

PyTree = Any


@dataclasses.dataclass(frozen=True)
class VAEKind:
  """One kind of VAE; `config` below is its Diffusers `config.json` dict.

  spatial_factor / temporal_factor: pixels per latent along height and width / along frames (1: images).
  decoder(config) -> `decode(params, scaled latents) -> pixels in [-1, 1]`, pure and jittable, in the
  denoiser's latent layout (images (B, C, H, W); video (B, F, C, H, W)).
  """
  class_name: str
  params_from_state_dict: Callable[[Mapping[str, Any], Mapping[str, Any]], PyTree]
  state_dict_from_params: Callable[[PyTree, Mapping[str, Any]], dict]
  spatial_factor: Callable[[Mapping[str, Any]], int]
  temporal_factor: Callable[[Mapping[str, Any]], int]
  decoder: Callable[[Mapping[str, Any]], Callable]
  video: bool = False


def _kl_decoder(config: Mapping[str, Any]) -> Callable:
  return AutoencoderKL(VAEConfig.from_dict(config)).images_from_latents


AUTOENCODER_KL = VAEKind(
    class_name="AutoencoderKL",
    params_from_state_dict=vae_io.vae_params_from_state_dict,
    state_dict_from_params=vae_io.vae_state_dict_from_params,
    spatial_factor=lambda config: 2 ** (len(config.get("block_out_channels", [0] * 4)) - 1),
    temporal_factor=lambda config: 1,
    decoder=_kl_decoder,
)

def _cogvideox_decoder(config: Mapping[str, Any]) -> Callable:
  """Scaled (B, F, C, h, w) latents -> (B, F, 3, H, W) video, as `CogVideoXPipeline.decode_latents` (tiling
  off, its default): divided by the scaling factor, decoded in Diffusers' frame batches with the convolution
  cache, which bounds the memory of a long clip by two latent frames' activations."""
  cfg = vae_cogvideox.CogVideoXVAEConfig.from_dict(config)

  def decode(params, latents):
    z = jnp.swapaxes(latents, 1, 2) / cfg.scaling_factor
    return jnp.swapaxes(vae_cogvideox.decode(params, z, cfg), 1, 2)

  return decode


AUTOENCODER_KL_COGVIDEOX = VAEKind(
    class_name="AutoencoderKLCogVideoX",
    params_from_state_dict=cogvideox_vae_io.params_from_state_dict,
    state_dict_from_params=cogvideox_vae_io.state_dict_from_params,
    spatial_factor=lambda config: vae_cogvideox.CogVideoXVAEConfig.from_dict(config).spatial_factor,
    temporal_factor=lambda config: vae_cogvideox.CogVideoXVAEConfig.from_dict(config).temporal_factor,
    decoder=_cogvideox_decoder,
    video=True,
)

KINDS = {kind.class_name: kind for kind in (AUTOENCODER_KL, AUTOENCODER_KL_COGVIDEOX)}


def kind_for(class_name) -> VAEKind:
  """The kind registered for a VAE's Diffusers class, or one line naming the supported ones."""
  if class_name not in KINDS:
    raise folders.FolderError(f"the pipeline's vae is {class_name!r}; supported: {', '.join(sorted(KINDS))}")
  return KINDS[class_name]
