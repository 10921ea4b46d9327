"""The UNet family (SD 1.5 / 2.x, SDXL): Diffusers' `UNet2DConditionModel` as a TDM backbone.

cond holds `encoder_hidden_states` (+ SDXL's `text_embeds` and `time_ids`). A unified student's K
enters through Diffusers' own class-embedding slot (`num_class_embeds`, a table added to the time
embedding), which folds exactly into `time_embedding.linear_2`'s bias; stock pipelines skip CFG for
a UNet that declares LCM's `time_cond_proj_dim`, so exports add it with an all-zero projection.
LoRA students also ship as Diffusers and kohya LoRA files (`convert/lora.py`).
"""

from __future__ import annotations

import dataclasses
import logging
import os

from tdm_jax.convert import lora as lora_io
from tdm_jax.convert import unet as unet_io
from tdm_jax.core import lora
from tdm_jax.infra.errors import ConfigError
from tdm_jax.models.unet import UNet2DConditionModel, UNetConfig
from tdm_jax.tasks.diffusers.backbones import Backbone


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
  lora_io.save_lora(os.path.join(dest, "lora"), pairs, lora_cfg, config_dict)
  if unified:
    table = full[(unet_io.STEP_EMBEDDING, "embedding")]
    for k in step_counts:
      lora_io.save_step_lora(os.path.join(dest, f"lora_{k}step"), unet_io.step_row(table, k), config_dict)
    logging.info("unified LoRA student: no lora_kohya.safetensors (kohya files cannot carry the step "
                 "table); use lora/ with lora_{K}step/ in Diffusers, or the merged pipeline_{K}step/")
  else:
    lora_io.save_kohya_lora(os.path.join(dest, "lora_kohya.safetensors"), pairs, lora_cfg, config_dict)


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
    sample_size=lambda config: config.sample_size,
    downsampling=lambda config: 2 ** (len(config.block_out_channels) - 1),
    lora_targets=lora.DEFAULT_TARGETS,
    step_table=unet_io.STEP_EMBEDDING,
    with_step_embeds=with_step_embeds,
    fold_steps=unet_io.fold_step_embedding,
    guidance_free=unet_io.guidance_free,
    write_lora=write_lora,
)
