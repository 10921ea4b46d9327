"""The PixArt family (PixArt-alpha 512 / 1024-MS, PixArt-Sigma): Diffusers' `PixArtTransformer2DModel`
as a TDM backbone.

cond holds the T5 caption states, their attention mask, and the image's resolution and aspect ratio
(read only by the 1024-MS models). The transformer predicts 8 channels, epsilon then a learned
variance; TDM uses the epsilon, as Diffusers' pipelines do. A unified student's K enters through a
table added to the timestep embedding (ours: PixArt has no class slot), which folds exactly into
`adaln_single.emb.timestep_embedder.linear_2`'s bias. PixArt pipelines have no slot that turns
classifier-free guidance off and load no LoRA files: students ship as merged folders, sampled with
guidance_scale=1 (`PIXART_ALPHA.stock_call`).

Prompts: one T5 encoder, 120 (alpha) or 300 (Sigma) tokens with their attention mask (caption cleaning
off); the transformer also gets the image's resolution and aspect ratio, which only the 1024-MS
models read. The stock call says no resolution binning: the latents given are the size sampled.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from tdm_jax.convert import pixart as pixart_io
from tdm_jax.core import lora
from tdm_jax.infra.errors import ConfigError
from tdm_jax.models.pixart import PixArtConfig, PixArtTransformer2DModel
from tdm_jax.tasks.diffusers.backbones import Backbone
from tdm_jax.tasks.diffusers.prompts import PipelineFamily


def _pixart(family, outputs, tokens, batch, image_size):
  del family
  height, width = image_size
  return {"encoder_hidden_states": outputs[0]["last_hidden_state"], "encoder_attention_mask": tokens[0]["mask"],
          "resolution": jnp.tile(jnp.asarray([[height, width]], jnp.float32), (batch, 1)),
          "aspect_ratio": jnp.full((batch, 1), height / width, jnp.float32)}


_PIXART_CALL = (("guidance_scale", 1.0), ("use_resolution_binning", False), ("clean_caption", False))
PIXART_ALPHA = PipelineFamily("pixart", _pixart, "one T5 text encoder", max_length=120, uses_mask=True,
                              kept_in_zeros=("encoder_attention_mask", "resolution", "aspect_ratio"),
                              stock_length_key="max_sequence_length", stock_call=_PIXART_CALL)
PIXART_SIGMA = dataclasses.replace(PIXART_ALPHA, max_length=300)


def pixart_apply(model: PixArtTransformer2DModel):
  """`apply(params, x_t, t, cond, adapters=None, num_steps=None)` -> epsilon (the first in_channels of the
  learned-sigma output, as Diffusers' pipelines take them)."""
  config = model.config
  learned_sigma = config.out_channels // 2 == config.in_channels

  def forward(params, x_t, t, cond, adapters=None, num_steps=None):
    variables = {"params": params} if adapters is None else {"params": params, "lora": adapters}
    out = model.apply(variables, x_t, t, cond["encoder_hidden_states"], cond.get("encoder_attention_mask"),
                      cond.get("resolution"), cond.get("aspect_ratio"), num_steps=num_steps)
    return out[:, :config.in_channels] if learned_sigma else out

  return forward


def with_step_embeds(config: PixArtConfig, rows: int) -> PixArtConfig:
  if config.num_step_embeds is not None:
    raise ConfigError(f"the teacher's transformer already has num_step_embeds={config.num_step_embeds}; leave "
                      f"tdm.step_choices empty")
  return dataclasses.replace(config, num_step_embeds=rows)


BACKBONE = Backbone(
    name="pixart",
    class_name="PixArtTransformer2DModel",
    config_from_dict=PixArtConfig.from_dict,
    module=lambda config, **kw: PixArtTransformer2DModel(config, **kw),
    apply_fn=pixart_apply,
    abstract_params=pixart_io.abstract_params,
    params_from_state_dict=pixart_io.pixart_params_from_state_dict,
    state_dict_from_params=pixart_io.pixart_state_dict_from_params,
    in_channels=lambda config: config.in_channels,
    sample_size=lambda config: (config.sample_size, config.sample_size),
    downsampling=lambda config: config.patch_size,
    lora_targets=lora.DEFAULT_TARGETS,  # attn1 / attn2 projections and the feed-forward, as the UNet's blocks
    step_table=pixart_io.STEP_EMBEDDING,
    with_step_embeds=with_step_embeds,
    fold_steps=pixart_io.fold_step_embedding,
    guidance_free=lambda params, config: (params, dict(config)),
    pipelines=(("PixArtSigma", PIXART_SIGMA), ("PixArtAlpha", PIXART_ALPHA)),
)
