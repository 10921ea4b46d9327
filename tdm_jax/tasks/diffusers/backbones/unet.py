"""The UNet family (SD 1.5 / 2.x, SDXL): Diffusers' `UNet2DConditionModel` as a TDM backbone.

cond holds `encoder_hidden_states` (+ SDXL's `text_embeds` and `time_ids`). A unified student's K
enters through Diffusers' own class-embedding slot (`num_class_embeds`, a table added to the time
embedding), which folds exactly into `time_embedding.linear_2`'s bias; stock pipelines skip CFG for
a UNet that declares LCM's `time_cond_proj_dim`, so exports add it with an all-zero projection.
LoRA students also ship as Diffusers LoRA files (`convert/lora.py` with `convert/unet.LORA_LAYOUT`) and
kohya ones (`convert/kohya.py`).

Prompts, as the pipelines' `encode_prompt` makes them:
- SD 1.5 / 2.x: one CLIP encoder; the UNet is conditioned on its last hidden state.
- SDXL: two encoders (CLIP ViT-L and OpenCLIP bigG with projection); the UNet gets their penultimate
  hidden states side by side (768 + 1280 = 2048), bigG's projected pooled embedding, and
  `add_time_ids` (original size, crop top-left, target size); its negative branch is zeros
  (`force_zeros_for_empty_prompt`) but for the time ids.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from tdm_jax.convert import kohya as kohya_io
from tdm_jax.convert import lora as lora_io
from tdm_jax.convert import unet as unet_io
from tdm_jax.core import lora
from tdm_jax.infra.errors import ConfigError
from tdm_jax.models.unet import UNet2DConditionModel, UNetConfig
from tdm_jax.tasks.diffusers.backbones import Backbone
from tdm_jax.tasks.diffusers.prompts import PipelineFamily


def sdxl_time_ids(batch: int, original_size=(1024, 1024), crop_top_left=(0, 0), target_size=(1024, 1024)):
  """SDXL's micro-conditioning: (original h, w, crop top, left, target h, w) per sample."""
  row = np.asarray(tuple(original_size) + tuple(crop_top_left) + tuple(target_size), np.float32)
  return np.tile(row, (batch, 1))


def sdxl_condition(encoder_outputs: Sequence[dict], time_ids) -> dict:
  """SDXL's UNet conditioning from its text encoders' outputs, in pipeline order: the penultimate
  hidden states concatenated on features, and the projected pooled embedding ("text_embeds") of the
  first encoder that has a projection. A pure function, so training can differentiate through it."""
  pooled = next((out["text_embeds"] for out in encoder_outputs if "text_embeds" in out), None)
  if pooled is None:
    raise ConfigError("SDXL needs a text encoder with projection (CLIPTextModelWithProjection) for the "
                      "pooled embedding; none of this pipeline's encoders has one")
  return {"encoder_hidden_states": jnp.concatenate([out["hidden_states"][-2] for out in encoder_outputs], axis=-1),
          "text_embeds": pooled, "time_ids": jnp.asarray(time_ids)}


def _sd(family, outputs, tokens, batch, image_size):
  del family, tokens, batch, image_size
  return {"encoder_hidden_states": outputs[0]["last_hidden_state"]}


def _sdxl(family, outputs, tokens, batch, image_size):
  del family, tokens
  return sdxl_condition(outputs, sdxl_time_ids(batch, image_size, (0, 0), image_size))


SD = PipelineFamily("sd", _sd, "one CLIP text encoder")
SDXL = PipelineFamily("sdxl", _sdxl, "CLIP text encoders, one with projection", needs_projection=True,
                      kept_in_zeros=("time_ids",), stock_load=(("add_watermarker", False),))


def unet_apply(model: UNet2DConditionModel):
  """`apply(params, x_t, t, cond, adapters=None, num_steps=None)` over the UNet: cond holds
  encoder_hidden_states (+ SDXL's extras); adapters, when given, are its "lora" collection (see
  `lora.adapters_applied`); num_steps, a unified student's K, its class label."""
  text_time = model.config.addition_embed_type == "text_time"

  def forward(params, x_t, t, cond, adapters=None, num_steps=None):
    variables = {"params": params} if adapters is None else {"params": params, "lora": adapters}
    extra = dict(added_cond_kwargs={"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}) if text_time else {}
    if num_steps is not None:
      extra["class_labels"] = num_steps
    return model.apply(variables, x_t, t, cond["encoder_hidden_states"], **extra)

  return forward


def with_step_embeds(config: UNetConfig, rows: int) -> UNetConfig:
  """The unified student's UNet: the teacher's plus a table of `rows` K embeddings added to the time
  embedding, Diffusers' `num_class_embeds` mechanism."""
  if config.num_class_embeds is not None:
    raise ConfigError(f"the teacher's UNet already has num_class_embeds={config.num_class_embeds}; "
                      f"tdm.step_choices needs that slot for the step count: leave tdm.step_choices empty")
  return dataclasses.replace(config, num_class_embeds=rows)


def write_lora(dest: str, pairs, full, lora_cfg: lora.LoraConfig, config_dict, step_counts, unified: bool) -> None:
  """`lora/` (Diffusers' `load_lora_weights`), and per K `lora_{K}step/` (the step table's row, a rank-1
  adapter of its own) for a unified student, or `lora_kohya.safetensors` (ComfyUI / A1111 keys) for a
  one-K student: kohya files have no slot for the table (Diffusers drops their bias keys for SDXL)."""
  lora_io.save_lora(os.path.join(dest, "lora"), pairs, lora_cfg, config_dict, layout=unet_io.LORA_LAYOUT)
  if unified:
    table = full[(unet_io.STEP_EMBEDDING, "embedding")]
    for k in step_counts:
      lora_io.save_step_lora(os.path.join(dest, f"lora_{k}step"), unet_io.step_row(table, k), config_dict,
                             layout=unet_io.LORA_LAYOUT)
    logging.info("unified LoRA student: no lora_kohya.safetensors (kohya files cannot carry the step "
                 "table); use lora/ with lora_{K}step/ in Diffusers, or the merged pipeline_{K}step/")
  else:
    kohya_io.save_kohya_lora(os.path.join(dest, "lora_kohya.safetensors"), pairs, lora_cfg, config_dict)


BACKBONE = Backbone(
    name="unet",
    class_name="UNet2DConditionModel",
    config_from_dict=UNetConfig.from_dict,
    module=lambda config, **kw: UNet2DConditionModel(config, **kw),
    apply_fn=unet_apply,
    abstract_params=unet_io.abstract_params,
    params_from_state_dict=unet_io.unet_params_from_state_dict,
    state_dict_from_params=unet_io.unet_state_dict_from_params,
    in_channels=lambda config: config.in_channels,
    sample_size=lambda config: (config.sample_size, config.sample_size),
    downsampling=lambda config: 2 ** (len(config.block_out_channels) - 1),
    lora_targets=lora.DEFAULT_TARGETS,
    step_table=unet_io.STEP_EMBEDDING,
    with_step_embeds=with_step_embeds,
    fold_steps=unet_io.fold_step_embedding,
    guidance_free=unet_io.guidance_free,
    write_lora=write_lora,
    pipelines=(("StableDiffusionXL", SDXL), ("StableDiffusion", SD)),
)
