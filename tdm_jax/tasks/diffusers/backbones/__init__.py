"""The model families a Diffusers pipeline can hold, as plug-ins: one module per denoiser class.

A pipeline's `model_index.json` names its denoiser's Diffusers class (`UNet2DConditionModel`,
`PixArtTransformer2DModel`, ...); `for_class` finds the family registered for it. A family says
everything the rest of the task needs, so that conversion, training, export and evaluation never ask
which network they hold: how its denoiser's config is read (refusing keys it does not implement), its
Flax module and apply function, its abstract parameters, its latent geometry (image or video latents,
the default size and frames, the patch that sets the pixel multiple and the token count), its LoRA
targets, where a unified student's step count K enters and how it folds into an exported folder, what
makes an exported student sample right in stock Diffusers, and its pipelines' prompt encoding
(`pipelines`: a `prompts.PipelineFamily` per pipeline class). The VAE and the text encoders are kinds
of their own, found by the class the folder names (`vaes.py`, `text_encoders.py`).

A new family is one model file (`models/`), one converter (`convert/`), one module here with its
`BACKBONE`, and one line in `FAMILIES`; a new VAE kind one model file, one converter and one line in
`vaes.KINDS`.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Any, Callable, Mapping, Optional, Tuple

import numpy as np

from tdm_jax.infra.errors import ConfigError

PyTree = Any

# Diffusers class name in model_index.json -> the module whose BACKBONE serves it.
FAMILIES = {
    "UNet2DConditionModel": "tdm_jax.tasks.diffusers.backbones.unet",
    "PixArtTransformer2DModel": "tdm_jax.tasks.diffusers.backbones.pixart",
    "SD3Transformer2DModel": "tdm_jax.tasks.diffusers.backbones.mmdit",
    "CogVideoXTransformer3DModel": "tdm_jax.tasks.diffusers.backbones.cogvideox",
}


@dataclasses.dataclass(frozen=True)
class Backbone:
  """One denoiser family. `config` is the family's own config object (from `config_from_dict`);
  `config_dict` a Diffusers `config.json` dict, which exports rewrite and write back.

  apply_fn(module) -> `apply(params, x_t, t, cond, adapters=None, num_steps=None)`: the model's
    prediction in the scheduler's parameterisation; `adapters` is the LoRA "lora" collection
    (`core/lora.adapters_applied`), `num_steps` a unified student's K per sample.
  step_table: the name of the unified student's K table at the top of its parameter tree; it is
    trained in full, and `optim.lr_scales` addresses it as "^{step_table}/".
  with_step_embeds(config, rows) -> the config of the step-conditioned student (a zero table).
  fold_steps(params, config_dict, k) -> (params, config_dict) of the student fixed at K = k, the
    table folded away exactly (stock pipelines pass no K).
  guidance_free(params, config_dict) -> (params, config_dict) that stock pipelines run without
    classifier-free guidance, where the family has such a slot (UNets: LCM's time_cond_proj_dim);
    otherwise `stock_call` must say `guidance_scale=1.0`.
  write_lora(dest, pairs, full, lora_cfg, config_dict, step_counts) -> LoRA files a stock pipeline
    loads into the teacher (None: the family's pipelines load no LoRA files; merged folders only).
  """
  name: str
  class_name: str
  config_from_dict: Callable[[Mapping[str, Any]], Any]
  module: Callable[..., Any]  # (config, *, dtype, attention_implementation, remat) -> flax module
  apply_fn: Callable[[Any], Callable]
  abstract_params: Callable[[Any], PyTree]  # boxed ShapeDtypeStructs with logical axis names
  params_from_state_dict: Callable[[Mapping[str, Any], Any], PyTree]
  state_dict_from_params: Callable[[PyTree, Any], dict]
  in_channels: Callable[[Any], int]
  sample_size: Callable[[Any], Tuple[int, int]]  # the latent (height, width) the model was trained at
  downsampling: Callable[[Any], int]  # the latent height and width must be multiples of this
  lora_targets: Tuple[str, ...]
  step_table: str
  with_step_embeds: Callable[[Any, int], Any]
  fold_steps: Callable[[PyTree, Mapping[str, Any], int], Tuple[PyTree, dict]]
  guidance_free: Callable[[PyTree, Mapping[str, Any]], Tuple[PyTree, dict]]
  write_lora: Optional[Callable[..., None]] = None
  weights_name: str = "diffusion_pytorch_model.safetensors"
  # Video denoisers: the pixel frames per clip the model was trained at (None: an image denoiser). Their
  # latents are (frames, channels, height, width) per sample (`geometry.LatentGeometry`).
  sample_frames: Optional[Callable[[Any], int]] = None
  # (pipeline class prefix, prompts.PipelineFamily) of the pipelines that hold this denoiser; Diffusers'
  # img2img / inpaint variants encode prompts as their base does, so a prefix serves them all.
  pipelines: Tuple[Tuple[str, Any], ...] = ()
  # check_family(config, family): refuses, in one line, a run's prompt family (its T5 length) that the
  # denoiser cannot take; None: any.
  check_family: Optional[Callable[[Any, Any], None]] = None
  # attention_shape(config, geometry, family) -> (tokens, heads) of the denoiser's largest attention, which
  # `models.attention.check_attention_fits` checks against the run's attention setting before anything
  # compiles (video DiTs: tens of thousands of tokens); None: not checked.
  attention_shape: Optional[Callable[[Any, Any, Any], Tuple[int, int]]] = None


def peft_lora_writer(layout, step_table_name: str) -> Callable[..., None]:
  """A `Backbone.write_lora` for transformer families whose pipelines load Diffusers (PEFT) LoRA files
  (`convert/lora.py`, `layout` the family's names): `lora/` holds the adapters as
  `transformer.<module>.lora_A/B.weight`, what the pipeline's `load_lora_weights` reads; a unified
  student's `lora_{K}step/` holds, per K, row K of its step table (`step_table_name`) as the `lora_B.bias`
  of a rank-1 adapter of its own on the layout's step module (`lora_io.save_step_lora`), loaded beside
  `lora/` with `set_adapters` at weight 1. No kohya file: kohya / SGM names exist for UNets only."""
  from tdm_jax.convert import lora as lora_io  # pylint: disable=g-import-not-at-top
  from tdm_jax.convert.errors import ConversionError  # pylint: disable=g-import-not-at-top

  def write_lora(dest: str, pairs, full, lora_cfg, config_dict, step_counts, unified: bool) -> None:
    lora_io.save_lora(os.path.join(dest, "lora"), pairs, lora_cfg, config_dict, layout=layout)
    if unified:
      table = np.asarray(full[(step_table_name, "embedding")], np.float32)
      for k in step_counts:
        if not 0 <= k < table.shape[0]:
          raise ConversionError(f"the student's step table has rows 0..{table.shape[0] - 1}; cannot write K={k}")
        lora_io.save_step_lora(os.path.join(dest, f"lora_{k}step"), table[k], config_dict, layout=layout)

  return write_lora


def for_class(class_name: str) -> Backbone:
  """The family registered for a denoiser's Diffusers class, or one line naming the supported ones."""
  if class_name not in FAMILIES:
    raise ConfigError(f"the pipeline's denoiser is a {class_name}, which tdm_jax does not distil; supported "
                      f"denoisers: {', '.join(sorted(FAMILIES))}")
  return importlib.import_module(FAMILIES[class_name]).BACKBONE


def pipeline_family(pipeline_class: str):
  """The prompt family of a pipeline class: the registered pipeline prefix that matches it, longest first
  (StableDiffusionXL before StableDiffusion), or one line naming the supported ones."""
  prefixes = sorted(((prefix, family) for module in FAMILIES.values()
                     for prefix, family in importlib.import_module(module).BACKBONE.pipelines),
                    key=lambda pair: -len(pair[0]))
  for prefix, family in prefixes:
    if pipeline_class.startswith(prefix):
      return family
  raise ConfigError(f"model_index.json names the pipeline class {pipeline_class!r}; tdm_jax encodes prompts for "
                    f"{', '.join(sorted(p + '*' for p, _ in prefixes))} pipelines")


def denoiser_component(index: Mapping[str, Any]) -> Tuple[str, str]:
  """(component name, class name) of the denoiser in a model_index.json dict: the component whose class is
  a registered family; a pipeline with a `unet` or `transformer` of another class is named in the error."""
  candidates = []
  for name, entry in index.items():
    if name.startswith("_") or not isinstance(entry, (list, tuple)) or len(entry) != 2 or entry[1] is None:
      continue
    if entry[1] in FAMILIES:
      return name, entry[1]
    if name in ("unet", "transformer", "prior"):
      candidates.append((name, entry[1]))
  if candidates:
    for_class(candidates[0][1])  # raises, naming the class
  raise ConfigError(f"model_index.json lists no denoiser (a unet or transformer of a supported class: "
                    f"{', '.join(sorted(FAMILIES))})")
