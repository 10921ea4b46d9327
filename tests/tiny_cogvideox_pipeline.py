"""A tiny, random CogVideoX pipeline saved as the real folders are (helpers for tests, no tests here).

`CogVideoXPipeline` with a 2-block `CogVideoXTransformer3DModel` shaped like the 2B (3-D sin-cos positions)
or the 5B (3-D rotary positions) (`tiny_cogvideox.VARIANTS`), the tiny T5 of `tiny_t5` with its
sentencepiece tokenizer, a 3-block `AutoencoderKLCogVideoX` (time compressed 4x by blocks 0 and 1, space
4x) and CogVideoX's DDIM scheduler (`SCHEDULER`). Its own clip is 9 frames of 16 x 24 pixels (3 latent
frames of 4 x 6). Every weight is random.
"""

from __future__ import annotations

import os
import shutil

import diffusers
import torch

import tiny_cogvideox
import tiny_pipeline
import tiny_t5

# THUDM/CogVideoX-2b scheduler/scheduler_config.json (5B: snr_shift_scale 1.0).
SCHEDULER = dict(beta_end=0.012, beta_schedule="scaled_linear", beta_start=0.00085, clip_sample=False,
                 clip_sample_range=1.0, num_train_timesteps=1000, prediction_type="v_prediction",
                 rescale_betas_zero_snr=True, sample_max_value=1.0, set_alpha_to_one=True, snr_shift_scale=3.0,
                 steps_offset=0, timestep_spacing="trailing")
VAE = dict(in_channels=3, out_channels=3, down_block_types=["CogVideoXDownBlock3D"] * 3,
           up_block_types=["CogVideoXUpBlock3D"] * 3, block_out_channels=[8, 16, 16], latent_channels=4,
           layers_per_block=1, norm_num_groups=4, temporal_compression_ratio=4, sample_height=16, sample_width=24,
           scaling_factor=1.15258426)
FRAMES, HEIGHT, WIDTH = 9, 16, 24  # the pipeline's own clip, in pixels
TEXT_TOKENS = 12  # the transformer's max_text_seq_length (226 in the real ones): the prompt length


def make_tiny_cogvideox_pipeline(folder, seed=0, variant="2b") -> diffusers.CogVideoXPipeline:
  """A complete tiny random CogVideoX pipeline saved to `folder` (safetensors) and read back from it."""
  folder = os.fspath(folder)
  tokenizer = tiny_t5.make_tiny_t5_tokenizer(os.path.join(folder, "tokenizer"))
  text_encoder = tiny_t5.random_t5_encoder(len(tokenizer), seed=seed + 1)
  config = dict(tiny_cogvideox.VARIANTS[variant], text_embed_dim=tiny_t5.TINY_ENCODER["d_model"],
                max_text_seq_length=TEXT_TOKENS, sample_frames=FRAMES, sample_height=HEIGHT // 4, sample_width=WIDTH // 4)
  transformer = tiny_cogvideox.random_transformer(config, seed=seed + 2)
  torch.manual_seed(seed + 3)
  vae = diffusers.AutoencoderKLCogVideoX(**VAE).eval()
  tiny_pipeline._randomise(vae)  # pylint: disable=protected-access
  scheduler = diffusers.CogVideoXDDIMScheduler(
      **dict(SCHEDULER, snr_shift_scale=3.0 if variant == "2b" else 1.0))
  pipe = diffusers.CogVideoXPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                                     transformer=transformer, scheduler=scheduler)
  pipe.save_pretrained(folder, safe_serialization=True)
  shutil.rmtree(os.path.join(folder, "tokenizer"))  # the Hub's layout: T5's tokenizer as spiece.model
  tiny_t5.make_tiny_t5_tokenizer(os.path.join(folder, "tokenizer"))
  return diffusers.CogVideoXPipeline.from_pretrained(folder)
