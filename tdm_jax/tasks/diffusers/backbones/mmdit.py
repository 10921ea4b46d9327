"""The MMDiT family (SD3-Medium, SD3.5-Medium, SD3.5-Large): Diffusers' `SD3Transformer2DModel` as a TDM
backbone.

cond holds the joint text states (the CLIP pair's penultimate states padded to T5's width, then T5's
tokens: `prompts.SD3`) and the pooled projections of both CLIPs. The transformer predicts the flow's
velocity; its scheduler (FlowMatchEulerDiscreteScheduler) makes the task's schedule a `FlowSchedule`,
so nothing here knows the parameterisation. A unified student's K enters through a table added to the
timestep embedding (ours), which folds exactly into `time_text_embed.timestep_embedder.linear_2`'s
bias. SD3 pipelines have no slot that turns classifier-free guidance off: their stock call says
guidance_scale=1 (`prompts.SD3.stock_call`). LoRA adapters sit on the attention projections of both
streams (and SD3.5-Medium's `attn2`), as Diffusers' SD3 LoRA training targets them; LoRA students also
ship as Diffusers LoRA files (`write_lora`, `convert/lora.py`).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from tdm_jax.convert import lora as lora_io
from tdm_jax.convert import mmdit as mmdit_io
from tdm_jax.convert.errors import ConversionError
from tdm_jax.core import lora
from tdm_jax.infra.errors import ConfigError
from tdm_jax.models.mmdit import MMDiTConfig, SD3Transformer2DModel
from tdm_jax.tasks.diffusers.backbones import Backbone


def mmdit_apply(model: SD3Transformer2DModel):
  """`apply(params, x_t, t, cond, adapters=None, num_steps=None)` -> the velocity at t = 1000 sigma."""

  def forward(params, x_t, t, cond, adapters=None, num_steps=None):
    variables = {"params": params} if adapters is None else {"params": params, "lora": adapters}
    return model.apply(variables, x_t, t, cond["encoder_hidden_states"], cond["pooled_projections"],
                       num_steps=num_steps)

  return forward


def with_step_embeds(config: MMDiTConfig, rows: int) -> MMDiTConfig:
  if config.num_step_embeds is not None:
    raise ConfigError(f"the teacher's transformer already has num_step_embeds={config.num_step_embeds}; leave "
                      f"tdm.step_choices empty")
  return dataclasses.replace(config, num_step_embeds=rows)


def write_lora(dest: str, pairs, full, lora_cfg: lora.LoraConfig, config_dict, step_counts, unified: bool) -> None:
  """`lora/`: the adapters as `transformer.<module>.lora_A/B.weight`, what `StableDiffusion3Pipeline.
  load_lora_weights` reads; for a unified student also, per K, `lora_{K}step/`: the step table's row K as
  the `lora_B.bias` of a rank-1 adapter of its own on `time_text_embed.timestep_embedder.linear_2`
  (`lora_io.save_step_lora`), loaded beside `lora/` with `set_adapters` at weight 1.

  No kohya file, unlike the UNet family: kohya / SGM names exist for the UNet (ComfyUI and A1111 read
  them there); for SD3 no consumer needs them: Diffusers reads this PEFT file, and ComfyUI maps
  Diffusers' `transformer.<module>` names of SD3 LoRAs itself (comfy/lora.py, `model_lora_keys_unet`).
  """
  lora_io.save_lora(os.path.join(dest, "lora"), pairs, lora_cfg, config_dict, layout=mmdit_io.LORA_LAYOUT)
  if unified:
    table = np.asarray(full[(mmdit_io.STEP_EMBEDDING, "embedding")], np.float32)
    for k in step_counts:
      if not 0 <= k < table.shape[0]:
        raise ConversionError(f"the student's step table has rows 0..{table.shape[0] - 1}; cannot write K={k}")
      lora_io.save_step_lora(os.path.join(dest, f"lora_{k}step"), table[k], config_dict, layout=mmdit_io.LORA_LAYOUT)


BACKBONE = Backbone(
    name="mmdit",
    class_name="SD3Transformer2DModel",
    config_from_dict=MMDiTConfig.from_dict,
    module=lambda config, **kw: SD3Transformer2DModel(config, **kw),
    apply_fn=mmdit_apply,
    abstract_params=mmdit_io.abstract_params,
    params_from_state_dict=mmdit_io.mmdit_params_from_state_dict,
    state_dict_from_params=mmdit_io.mmdit_state_dict_from_params,
    in_channels=lambda config: config.in_channels,
    sample_size=lambda config: config.sample_size,
    downsampling=lambda config: config.patch_size,
    lora_targets=mmdit_io.LORA_TARGETS,
    step_table=mmdit_io.STEP_EMBEDDING,
    with_step_embeds=with_step_embeds,
    fold_steps=mmdit_io.fold_step_embedding,
    guidance_free=lambda params, config: (params, dict(config)),
    write_lora=write_lora,
)
