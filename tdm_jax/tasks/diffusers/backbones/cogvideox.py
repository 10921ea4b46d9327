"""The CogVideoX family (CogVideoX-2B, CogVideoX-5B, text to video): Diffusers'
`CogVideoXTransformer3DModel` as a TDM backbone.

Latents are video, (frames, channels, height, width) per sample as Diffusers' video transformers take
them: 49 pixel frames make 13 latent frames through the causal 3-D VAE (`AutoencoderKLCogVideoX`,
`vaes.py`). cond holds T5's states. The transformer predicts v on CogVideoX's DDIM schedule (SNR-shifted,
zero terminal SNR: `core/schedules.py`). A unified student's K enters through a table added to the
timestep embedding (ours), which folds exactly into `time_embedding.linear_2`'s bias. CogVideoX pipelines
have no slot that turns classifier-free guidance off: their stock call says guidance_scale=1. LoRA
adapters sit on the attention projections, as the TDM authors' released CogVideoX-2B LoRA and Diffusers'
CogVideoX LoRA training place them, and ship as Diffusers LoRA files that `CogVideoXPipeline.
load_lora_weights` reads.

Prompts, as `CogVideoXPipeline.encode_prompt` makes them: one T5 encoder, 226 tokens, and no attention
mask (the pipeline passes none, so T5 attends to the padding and the transformer reads every state).
"""

from __future__ import annotations

import dataclasses

from tdm_jax.convert import cogvideox as cogvideox_io
from tdm_jax.infra.errors import ConfigError
from tdm_jax.models.cogvideox import CogVideoXConfig, CogVideoXTransformer3DModel
from tdm_jax.tasks.diffusers.backbones import Backbone, peft_lora_writer
from tdm_jax.tasks.diffusers.prompts import PipelineFamily


def cogvideox_apply(model: CogVideoXTransformer3DModel):
  """`apply(params, x_t, t, cond, adapters=None, num_steps=None)` -> v over (B, F, C, H, W) latents."""

  def forward(params, x_t, t, cond, adapters=None, num_steps=None):
    variables = {"params": params} if adapters is None else {"params": params, "lora": adapters}
    return model.apply(variables, x_t, t, cond["encoder_hidden_states"], num_steps=num_steps)

  return forward


def with_step_embeds(config: CogVideoXConfig, rows: int) -> CogVideoXConfig:
  if config.num_step_embeds is not None:
    raise ConfigError(f"the teacher's transformer already has num_step_embeds={config.num_step_embeds}; leave "
                      f"tdm.step_choices empty")
  return dataclasses.replace(config, num_step_embeds=rows)


def check_family(config: CogVideoXConfig, family: PipelineFamily) -> None:
  """CogVideoX-2B-style transformers add a stored position table over [text; video] that Diffusers sizes
  for exactly `max_text_seq_length` text tokens: a stock pipeline with any other T5 length fails."""
  if not config.use_rotary_positional_embeddings and family.max_length != config.max_text_seq_length:
    raise ConfigError(f"model.max_sequence_length={family.max_length}: this CogVideoX transformer (3-D sin-cos "
                      f"positions, as CogVideoX-2B) takes exactly max_text_seq_length={config.max_text_seq_length} "
                      f"text tokens; set it to 0 (or {config.max_text_seq_length})")


def _cogvideox(family, outputs, tokens, batch, image_size):
  del family, tokens, batch, image_size
  return {"encoder_hidden_states": outputs[0]["last_hidden_state"]}


COGVIDEOX = PipelineFamily("cogvideox", _cogvideox, "one T5 text encoder", max_length=226,
                           denoiser_fields=(("max_length", "max_text_seq_length", 226),),
                           stock_length_key="max_sequence_length",
                           stock_call=(("guidance_scale", 1.0), ("use_dynamic_cfg", False)),
                           stock_size_keys=("height", "width", "num_frames"))

BACKBONE = Backbone(
    name="cogvideox",
    class_name="CogVideoXTransformer3DModel",
    config_from_dict=CogVideoXConfig.from_dict,
    module=lambda config, **kw: CogVideoXTransformer3DModel(config, **kw),
    apply_fn=cogvideox_apply,
    abstract_params=cogvideox_io.abstract_params,
    params_from_state_dict=cogvideox_io.cogvideox_params_from_state_dict,
    state_dict_from_params=cogvideox_io.cogvideox_state_dict_from_params,
    in_channels=lambda config: config.in_channels,
    sample_size=lambda config: (config.sample_height, config.sample_width),
    sample_frames=lambda config: config.sample_frames,
    downsampling=lambda config: config.patch_size,
    lora_targets=cogvideox_io.LORA_TARGETS,
    step_table=cogvideox_io.STEP_EMBEDDING,
    with_step_embeds=with_step_embeds,
    fold_steps=cogvideox_io.fold_step_embedding,
    guidance_free=lambda params, config: (params, dict(config)),
    write_lora=peft_lora_writer(cogvideox_io.LORA_LAYOUT, cogvideox_io.STEP_EMBEDDING),
    # Text to video only: image- and video-to-video pipelines (another transformer input) are refused by name.
    pipelines=(("CogVideoXPipeline", COGVIDEOX),),
    check_family=check_family,
    # One joint attention over [text; video] tokens in every block.
    attention_shape=lambda config, geometry, family: (geometry.tokens + family.max_length,
                                                      config.num_attention_heads),
)
