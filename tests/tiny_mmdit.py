"""Tiny, random Diffusers SD3Transformer2DModels shaped like the published ones (helpers for tests, no tests here).

SD3-Medium: no dual attention, no QK norm. SD3.5-Medium: dual attention (`attn2`) in the first half of
the blocks, RMS QK norm. SD3.5-Large: RMS QK norm, no dual attention. Every weight is random
(Diffusers zero-initialises some layers, which would hide mapping mistakes); the position table is
bigger than the latents' patch grid, as the real ones are, so the centre crop is exercised.
"""

from __future__ import annotations

import diffusers
import numpy as np
import torch

import tiny_pipeline

JOINT = 32  # joint_attention_dim (the text encoders' concatenated width; 4096 in the real models)
POOLED = 24  # pooled_projection_dim (2048 in the real models)
BASE = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, joint_attention_dim=JOINT,
            pooled_projection_dim=POOLED, pos_embed_max_size=12)
VARIANTS = {
    "sd3_medium": dict(BASE, num_layers=3, num_attention_heads=2, attention_head_dim=8, caption_projection_dim=16,
                       dual_attention_layers=(), qk_norm=None),
    "sd35_medium": dict(BASE, num_layers=4, num_attention_heads=2, attention_head_dim=12, caption_projection_dim=24,
                        dual_attention_layers=(0, 1), qk_norm="rms_norm", pos_embed_max_size=16),
    "sd35_large": dict(BASE, num_layers=3, num_attention_heads=2, attention_head_dim=16, caption_projection_dim=32,
                       dual_attention_layers=(), qk_norm="rms_norm", out_channels=6),
}


def random_sd3_transformer(kwargs, seed=0) -> diffusers.SD3Transformer2DModel:
  """A Diffusers SD3Transformer2DModel of `kwargs` with every parameter random (norm scales around 1)."""
  torch.manual_seed(seed)
  model = diffusers.SD3Transformer2DModel(**kwargs).eval()
  tiny_pipeline._randomise(model)  # pylint: disable=protected-access
  return model


def state_dict(model) -> dict:
  """The model's state dict as numpy arrays (with Diffusers' `pos_embed.pos_embed` buffer)."""
  return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def inputs(kwargs, height, width, seed=0, length=7):
  """(sample, timestep, encoder_hidden_states, pooled_projections) for a batch of 2, distinct float timesteps."""
  rng = np.random.default_rng(seed)
  sample = rng.standard_normal((2, kwargs["in_channels"], height, width)).astype(np.float32)
  t = np.array([999.0, 321.5], np.float32)
  context = rng.standard_normal((2, length, kwargs["joint_attention_dim"])).astype(np.float32)
  pooled = rng.standard_normal((2, kwargs["pooled_projection_dim"])).astype(np.float32)
  return sample, t, context, pooled


def run_diffusers(model, sample, t, context, pooled) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(sample), encoder_hidden_states=torch.from_numpy(context),
                 pooled_projections=torch.from_numpy(pooled), timestep=torch.from_numpy(t)).sample.numpy()
