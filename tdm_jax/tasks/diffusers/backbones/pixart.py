"""The PixArt family (PixArt-alpha 512 / 1024-MS, PixArt-Sigma): Diffusers' `PixArtTransformer2DModel`
as a TDM backbone.

cond holds the T5 caption states, their attention mask, and the image's resolution and aspect ratio
(read only by the 1024-MS models). The transformer predicts 8 channels, epsilon then a learned
variance; TDM uses the epsilon, as Diffusers' pipelines do. A unified student's K enters through a
table added to the timestep embedding (ours: PixArt has no class slot), which folds exactly into
`adaln_single.emb.timestep_embedder.linear_2`'s bias. PixArt pipelines have no slot that turns
classifier-free guidance off and load no LoRA files: students ship as merged folders, sampled with
guidance_scale=1 (`prompts.PIXART_ALPHA.stock_call`).
"""

from __future__ import annotations

import dataclasses

from tdm_jax.convert import pixart as pixart_io
from tdm_jax.core import lora
from tdm_jax.infra.errors import ConfigError
from tdm_jax.models.pixart import PixArtConfig, PixArtTransformer2DModel
from tdm_jax.tasks.diffusers.backbones import Backbone


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
    sample_size=lambda config: config.sample_size,
    downsampling=lambda config: config.patch_size,
    lora_targets=lora.DEFAULT_TARGETS,  # attn1 / attn2 projections and the feed-forward, as the UNet's blocks
    step_table=pixart_io.STEP_EMBEDDING,
    with_step_embeds=with_step_embeds,
    fold_steps=pixart_io.fold_step_embedding,
    guidance_free=lambda params, config: (params, dict(config)),
)
