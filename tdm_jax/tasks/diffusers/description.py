"""A Diffusers pipeline folder read once into one description that conversion, prompt encoding,
training, export and evaluation all use: its denoiser (and the backbone family that serves it), its
text encoders with their tokenizers, its VAE (and the kind that serves it), its scheduler, and its
pipeline family.

Every component's kind comes from the class `model_index.json` names for it, never from its folder
name, so a pipeline with a `transformer/` and a T5 `text_encoder/` (PixArt) is read by the same code
as one with a `unet/` and two CLIP encoders (SDXL).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import numpy as np

from tdm_jax.convert import folders
from tdm_jax.tasks.diffusers import backbones, geometry, prompts, text_encoders, vaes

PyTree = Any
ENCODER_SLOTS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"), ("tokenizer_3", "text_encoder_3"))


@dataclasses.dataclass(frozen=True)
class EncoderSlot:
  """A (tokenizer, text encoder) pair of the pipeline and what the encoder is."""
  tokenizer: str
  encoder: str
  kind: text_encoders.TextEncoderKind
  config: Any
  config_dict: dict


@dataclasses.dataclass(frozen=True)
class PipelineDescription:
  folder: str
  index: dict
  pipeline_class: str
  family: prompts.PipelineFamily
  denoiser: str  # its component name: "unet" or "transformer"
  backbone: backbones.Backbone
  denoiser_config: Any  # the backbone's config object
  denoiser_config_dict: dict
  encoders: tuple  # EncoderSlot, in pipeline order
  vae: vaes.VAEKind
  vae_config_dict: dict
  scheduler_config: dict

  @property
  def vae_scale_factor(self) -> int:
    return int(self.vae.spatial_factor(self.vae_config_dict))

  @property
  def force_zeros_for_empty_prompt(self) -> bool:
    return bool(self.index.get("force_zeros_for_empty_prompt", False))

  @property
  def model_components(self) -> tuple:
    """The components holding weights, denoiser first."""
    return (self.denoiser,) + tuple(s.encoder for s in self.encoders) + ("vae",)

  def geometry(self, model=None) -> geometry.LatentGeometry:
    """The latent geometry that config section `model` asks for (`model.resolution`, `height`, `width`,
    `num_frames`; None or 0s: the denoiser's own size and frames), refused up front when the VAE and the
    denoiser cannot make it."""
    c, backbone = self.denoiser_config, self.backbone
    h, w = backbone.sample_size(c)
    return geometry.from_config(
        model if model is not None else {"resolution": 0}, channels=int(backbone.in_channels(c)),
        default_size=(int(h) * self.vae_scale_factor, int(w) * self.vae_scale_factor),
        default_frames=backbone.sample_frames(c) if backbone.sample_frames else None,
        spatial_factor=self.vae_scale_factor, temporal_factor=int(self.vae.temporal_factor(self.vae_config_dict)),
        patch=int(backbone.downsampling(c)), name=backbone.name)

  def decoder(self):
    """`decode(vae params, scaled latents) -> pixels in [-1, 1]` of this pipeline's VAE (pure, jittable)."""
    return self.vae.decoder(self.vae_config_dict)

  def config_dict(self, name: str) -> dict:
    if name == self.denoiser:
      return self.denoiser_config_dict
    if name == "vae":
      return self.vae_config_dict
    return next(s.config_dict for s in self.encoders if s.encoder == name)

  def params_from_state_dict(self, name: str, state: Mapping[str, np.ndarray]) -> PyTree:
    """One component's checkpoint tensors as our parameter tree, checked name by name."""
    if name == self.denoiser:
      return self.backbone.params_from_state_dict(state, self.denoiser_config_dict)
    if name == "vae":
      return self.vae.params_from_state_dict(state, self.vae_config_dict)
    slot = next(s for s in self.encoders if s.encoder == name)
    return slot.kind.params_from_state_dict(state, slot.config)

  def write_component(self, name: str, params: PyTree, config: dict, out_dir: str, dtype=np.float32) -> str:
    """A component's Diffusers/Transformers folder (config.json + safetensors) from our tree and `config`."""
    if name == self.denoiser:
      state, weights = self.backbone.state_dict_from_params(params, config), self.backbone.weights_name
    elif name == "vae":
      state, weights = self.vae.state_dict_from_params(params, config), "diffusion_pytorch_model.safetensors"
    else:
      slot = next(s for s in self.encoders if s.encoder == name)
      state = slot.kind.state_dict_from_params(params, slot.kind.config_from_dict(config))
      weights = slot.kind.weights_name
    folders.save_state_dict(out_dir, {k: np.asarray(v, dtype) for k, v in state.items()}, config,
                            weights_name=weights)
    return out_dir


def _listed(index: Mapping[str, Any], name: str) -> Optional[str]:
  """The class model_index.json gives component `name`, or None when absent or null."""
  entry = index.get(name)
  if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] is not None:
    return entry[1]
  return None


def describe(folder: str) -> PipelineDescription:
  """Reads `folder` (model_index.json and every component's config) once; clear errors name what is wrong."""
  index = folders.read_model_index(folder)
  pipeline_class = str(index.get("_class_name", ""))
  denoiser, denoiser_class = backbones.denoiser_component(index)
  backbone = backbones.for_class(denoiser_class)
  family = backbones.pipeline_family(pipeline_class)
  denoiser_dict = folders.read_config(folders.component_path(folder, denoiser))
  family = family.for_pipeline(index, denoiser_dict)
  slots = []
  for tok, enc in ENCODER_SLOTS:
    cls = _listed(index, enc)
    if cls is None:
      continue
    kind = text_encoders.kind_for(cls, enc)
    config_dict = folders.read_config(folders.component_path(folder, enc))
    slots.append(EncoderSlot(tok, enc, kind, kind.config_from_dict(config_dict), config_dict))
  if not slots:
    raise folders.FolderError(f"the pipeline in {folder} has no text encoder; a {pipeline_class} needs "
                              f"{family.encoders}")
  if family.needs_projection and not any(getattr(s.config, "with_projection", False) for s in slots):
    raise folders.FolderError(
        f"{folder!r} is an SDXL pipeline but none of its text encoders has a text projection for the pooled "
        f"embedding; text_encoder_2 must be a CLIPTextModelWithProjection (index entry: "
        f"{index.get('text_encoder_2')!r})")
  for name in family.projections:  # SD3: both CLIPs give a pooled embedding
    slot = next((s for s in slots if s.encoder == name), None)
    if slot is None or not getattr(slot.config, "with_projection", False):
      raise folders.FolderError(
          f"{folder!r} is a {pipeline_class}, whose pooled projections need {name} to be a "
          f"CLIPTextModelWithProjection (index entry: {index.get(name)!r})")
  vae = vaes.kind_for(_listed(index, "vae"))
  return PipelineDescription(
      folder=folder, index=index, pipeline_class=pipeline_class, family=family, denoiser=denoiser,
      backbone=backbone, denoiser_config=backbone.config_from_dict(denoiser_dict), denoiser_config_dict=denoiser_dict,
      encoders=tuple(slots), vae=vae, vae_config_dict=folders.read_config(folders.component_path(folder, "vae")),
      scheduler_config=folders.read_config(folders.component_path(folder, "scheduler")))
