"""The MMDiT family (SD3-Medium, SD3.5-Medium, SD3.5-Large): Diffusers' `SD3Transformer2DModel` as a TDM
backbone.

cond holds the joint text states (the CLIP pair's penultimate states padded to T5's width, then T5's
tokens: `SD3` below) and the pooled projections of both CLIPs. The transformer predicts the flow's
velocity; its scheduler (FlowMatchEulerDiscreteScheduler) makes the task's schedule a `FlowSchedule`,
so nothing here knows the parameterisation. A unified student's K enters through a table added to the
timestep embedding (ours), which folds exactly into `time_text_embed.timestep_embedder.linear_2`'s
bias. SD3 pipelines have no slot that turns classifier-free guidance off: their stock call says
guidance_scale=1 (`SD3.stock_call`). LoRA adapters sit on the attention projections of both
streams (and SD3.5-Medium's `attn2`), as Diffusers' SD3 LoRA training targets them; LoRA students also
ship as Diffusers LoRA files (`peft_lora_writer`, `convert/lora.py`).

Prompts: CLIP-L and CLIP-G with projection and T5 (text_encoder_3, optional). The CLIPs' penultimate
hidden states side by side (768 + 1280), zero-padded on features to T5's width (the transformer's
joint_attention_dim, 4096), then T5's last hidden state after them on the sequence axis (77 + 256
tokens); the pooled projections are the two CLIPs' projected pooled embeddings side by side (2048).
Both CLIPs take the first CLIP tokenizer's length; T5 takes `max_sequence_length` (256) tokens and,
as in Diffusers, no attention mask (nor does the transformer). Without text_encoder_3 its states
are zeros (batch, max_sequence_length, joint_attention_dim), as Diffusers makes them.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax.numpy as jnp

from tdm_jax.convert import mmdit as mmdit_io
from tdm_jax.infra.errors import ConfigError
from tdm_jax.models.mmdit import MMDiTConfig, SD3Transformer2DModel
from tdm_jax.tasks.diffusers.backbones import Backbone, peft_lora_writer
from tdm_jax.tasks.diffusers.prompts import PipelineFamily


def sd3_condition(encoder_outputs: Sequence[dict], batch: int, max_length: int,
                  joint_attention_dim: Optional[int]) -> dict:
  """SD3's transformer conditioning from its text encoders' outputs, in pipeline order (CLIP-L, CLIP-G,
  then T5 when the pipeline has it), as `StableDiffusion3Pipeline.encode_prompt` makes it (clip_skip
  None). Without T5, its states are zeros of (batch, max_length, joint_attention_dim). Pure."""
  clips = [out for out in encoder_outputs if "hidden_states" in out]  # T5's outputs have no per-layer states
  t5 = [out for out in encoder_outputs if "hidden_states" not in out]
  if len(clips) != 2 or len(t5) > 1:
    raise ConfigError(f"SD3 needs two CLIP text encoders and at most one T5; this pipeline's encoders give "
                      f"{len(clips)} CLIP and {len(t5)} T5 outputs")
  if any("text_embeds" not in out for out in clips):
    raise ConfigError("SD3's pooled projections need both CLIP text encoders with projection "
                      "(CLIPTextModelWithProjection)")
  clip = jnp.concatenate([out["hidden_states"][-2] for out in clips], axis=-1)
  if t5:
    states = t5[0]["last_hidden_state"]
    if joint_attention_dim is not None and states.shape[-1] != joint_attention_dim:
      raise ConfigError(f"text_encoder_3 gives {states.shape[-1]} features but the transformer's "
                        f"joint_attention_dim is {joint_attention_dim}")
  elif joint_attention_dim is None:
    raise ConfigError("an SD3 pipeline without text_encoder_3 needs the transformer's joint_attention_dim for "
                      "T5's zero states; the family has none (PipelineFamily.for_pipeline fills it)")
  else:
    states = jnp.zeros((batch, max_length, joint_attention_dim), clip.dtype)
  # torch.nn.functional.pad to T5's width: zeros on the right (a negative pad, never in real models, crops).
  width = states.shape[-1]
  if clip.shape[-1] <= width:
    clip = jnp.pad(clip, ((0, 0), (0, 0), (0, width - clip.shape[-1])))
  else:
    clip = clip[..., :width]
  return {"encoder_hidden_states": jnp.concatenate([clip, states], axis=1),
          "pooled_projections": jnp.concatenate([out["text_embeds"] for out in clips], axis=-1)}


def _sd3(family, outputs, tokens, batch, image_size):
  del tokens, image_size
  return sd3_condition(outputs, batch, family.max_length, family.joint_attention_dim)


SD3 = PipelineFamily("sd3", _sd3, "CLIP text encoders with projection in text_encoder and text_encoder_2, and "
                     "optionally a T5 in text_encoder_3", max_length=256,
                     projections=("text_encoder", "text_encoder_2"), shared_clip_length=True,
                     optional_components=("text_encoder_3", "tokenizer_3"),
                     denoiser_fields=(("joint_attention_dim", "joint_attention_dim", 4096),),
                     stock_length_key="max_sequence_length", stock_call=(("guidance_scale", 1.0),))


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
    sample_size=lambda config: (config.sample_size, config.sample_size),
    downsampling=lambda config: config.patch_size,
    lora_targets=mmdit_io.LORA_TARGETS,
    step_table=mmdit_io.STEP_EMBEDDING,
    with_step_embeds=with_step_embeds,
    fold_steps=mmdit_io.fold_step_embedding,
    guidance_free=lambda params, config: (params, dict(config)),
    # No kohya file: for SD3 no consumer needs one (ComfyUI maps Diffusers' `transformer.<module>` names).
    write_lora=peft_lora_writer(mmdit_io.LORA_LAYOUT, mmdit_io.STEP_EMBEDDING),
    pipelines=(("StableDiffusion3", SD3),),
)
