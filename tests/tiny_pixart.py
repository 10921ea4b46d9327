"""A tiny, random PixArt pipeline saved as the real folders are (helpers for tests, no tests here).

`PixArtAlphaPipeline` (or `PixArtSigmaPipeline`) with a 2-block `PixArtTransformer2DModel`, the tiny
T5 encoder of `tiny_t5` saved sharded with an index, its sentencepiece tokenizer as PixArt's
`tokenizer/` holds it (spiece.model + tokenizer_config.json), the tiny VAE of `tiny_pipeline` and
PixArt's DPM-Solver++ scheduler config (linear betas 1e-4..0.02). Every weight is random (Diffusers
zero-initialises some layers, which would hide mapping mistakes).
"""

from __future__ import annotations

import os
import shutil

import diffusers
import torch

import tiny_pipeline
import tiny_t5

# PixArt-XL-2's scheduler config (PixArt-alpha/PixArt-XL-2-512x512/scheduler), as DPMSolverMultistepScheduler reads it.
PIXART_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                        prediction_type="epsilon", algorithm_type="dpmsolver++", solver_order=2,
                        lower_order_final=True, timestep_spacing="linspace", steps_offset=0)
VARIANTS = {  # the real models' shapes in small: which conditions they read, how they scale positions
    "alpha": dict(use_additional_conditions=False, interpolation_scale=1),
    "alpha_ms": dict(use_additional_conditions=True, interpolation_scale=2),
    "sigma": dict(use_additional_conditions=False, interpolation_scale=2),
}


def make_tiny_pixart_pipeline(folder, seed=0, variant="alpha", num_layers=2):
  """A complete tiny random PixArt pipeline saved to `folder` (16 px images, 8x8 latents) and read back."""
  folder = os.fspath(folder)
  tokenizer = tiny_t5.make_tiny_t5_tokenizer(os.path.join(folder, "tokenizer"))
  text_encoder = tiny_t5.random_t5_encoder(len(tokenizer), seed=seed + 1)
  torch.manual_seed(seed + 2)
  transformer = diffusers.PixArtTransformer2DModel(
      num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=8, num_layers=num_layers,
      cross_attention_dim=24, caption_channels=tiny_t5.TINY_ENCODER["d_model"], sample_size=8, patch_size=2,
      norm_num_groups=8, **VARIANTS[variant]).eval()
  tiny_pipeline._randomise(transformer)  # pylint: disable=protected-access
  cls = diffusers.PixArtSigmaPipeline if variant == "sigma" else diffusers.PixArtAlphaPipeline
  pipe = cls(tokenizer=tokenizer, text_encoder=text_encoder, vae=tiny_pipeline._vae(seed + 3),  # pylint: disable=protected-access
             transformer=transformer, scheduler=diffusers.DPMSolverMultistepScheduler(**PIXART_SCHEDULER))
  pipe.save_pretrained(folder, safe_serialization=True)
  # The Hub's layouts: T5's tokenizer as spiece.model, its encoder sharded with an index.
  shutil.rmtree(os.path.join(folder, "tokenizer"))
  tiny_t5.make_tiny_t5_tokenizer(os.path.join(folder, "tokenizer"))
  shutil.rmtree(os.path.join(folder, "text_encoder"))
  text_encoder.save_pretrained(os.path.join(folder, "text_encoder"), max_shard_size="20KB")
  return cls.from_pretrained(folder)
