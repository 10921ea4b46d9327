"""A tiny, random Stable Diffusion 3 / 3.5 pipeline saved as the real folders are (helpers for tests, no tests).

`StableDiffusion3Pipeline` with its three text encoders: CLIP-L-like and CLIP-G-like
`CLIPTextModelWithProjection`s (the first with the legacy `eos_token_id` 2 of the real CLIP-L config,
quick_gelu; the second gelu, its tokenizer padding with "!" and stored by hand as vocab.json +
merges.txt), the tiny T5 of `tiny_t5` (sentencepiece `tokenizer_3/`, sharded `text_encoder_3/`); a
2-layer `SD3Transformer2DModel` (joint_attention_dim = T5's width 32, wider than the two CLIP widths
side by side, 8 + 16, so the zero padding shows), a 16-channel `AutoencoderKL` without quant convs and
with a shift factor, and `FlowMatchEulerDiscreteScheduler(shift=3.0)`. Every weight is random
(Diffusers zero-initialises some layers, which would hide mapping mistakes).
"""

from __future__ import annotations

import os
import shutil

import diffusers
import torch
import transformers

import tiny_pipeline
import tiny_t5

CLIP_L = dict(hidden=8, projection=8)  # text_encoder
CLIP_G = dict(hidden=16, projection=16)  # text_encoder_2
JOINT_DIM = tiny_t5.TINY_ENCODER["d_model"]  # T5's width = the transformer's joint_attention_dim
POOLED_DIM = CLIP_L["projection"] + CLIP_G["projection"]
SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)
# The real VAE's factors (stabilityai/stable-diffusion-3-medium-diffusers/vae).
VAE_FACTORS = dict(shift_factor=0.0609, scaling_factor=1.5305)
VARIANTS = {  # the real transformers' shapes in small
    "sd3": dict(),  # SD3 medium
    "sd35_medium": dict(qk_norm="rms_norm", dual_attention_layers=(0,)),
    "sd35_large": dict(qk_norm="rms_norm"),
}


def _clip(hidden, projection, pad_token, seed, eos_token_id=None, **extra):
  vocab, _ = tiny_pipeline.tiny_vocab()
  config = transformers.CLIPTextConfig(
      vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=3,
      num_attention_heads=4, max_position_embeddings=tiny_pipeline.MAX_LENGTH, projection_dim=projection,
      bos_token_id=vocab[tiny_pipeline.BOS], pad_token_id=vocab[pad_token],
      eos_token_id=vocab[tiny_pipeline.EOS] if eos_token_id is None else eos_token_id, **extra)
  torch.manual_seed(seed)
  model = transformers.CLIPTextModelWithProjection(config).eval()
  tiny_pipeline._randomise(model)  # pylint: disable=protected-access
  return model


def tiny_sd3_vae(seed=0) -> diffusers.AutoencoderKL:
  """A random 16-channel SD3-shaped AutoencoderKL: no quant convs, shift and scaling factors set."""
  torch.manual_seed(seed)
  vae = diffusers.AutoencoderKL(
      in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
      up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
      latent_channels=16, norm_num_groups=8, sample_size=16, use_quant_conv=False, use_post_quant_conv=False,
      **VAE_FACTORS).eval()
  tiny_pipeline._randomise(vae)  # pylint: disable=protected-access
  return vae


def tiny_sd3_transformer(seed=0, variant="sd3", num_layers=2) -> diffusers.SD3Transformer2DModel:
  torch.manual_seed(seed)
  transformer = diffusers.SD3Transformer2DModel(
      sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=num_layers, attention_head_dim=8,
      num_attention_heads=2, joint_attention_dim=JOINT_DIM, caption_projection_dim=16,
      pooled_projection_dim=POOLED_DIM, pos_embed_max_size=16, **VARIANTS[variant]).eval()
  tiny_pipeline._randomise(transformer)  # pylint: disable=protected-access
  return transformer


def make_tiny_sd3_pipeline(folder, seed=0, with_t5=True, variant="sd3",
                           num_layers=2) -> diffusers.StableDiffusion3Pipeline:
  """A complete tiny random SD3 pipeline saved to `folder` (16 px images, 8x8x16 latents) and read back.

  with_t5=False: no tokenizer_3 / text_encoder_3 (model_index.json entries null), as SD3 runs without
  T5. variant: "sd3", "sd35_medium" (qk RMS norm, dual attention in layer 0) or "sd35_large" (qk norm).
  """
  folder = os.fspath(folder)
  text_encoder = _clip(CLIP_L["hidden"], CLIP_L["projection"], tiny_pipeline.EOS, seed + 1, eos_token_id=2)
  text_encoder_2 = _clip(CLIP_G["hidden"], CLIP_G["projection"], "!", seed + 2, hidden_act="gelu")
  tokenizer_3 = text_encoder_3 = None
  if with_t5:
    tokenizer_3 = tiny_t5.make_tiny_t5_tokenizer(os.path.join(folder, "tokenizer_3"))
    text_encoder_3 = tiny_t5.random_t5_encoder(len(tokenizer_3), seed=seed + 3)
  pipe = diffusers.StableDiffusion3Pipeline(
      transformer=tiny_sd3_transformer(seed + 4, variant, num_layers),
      scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=tiny_sd3_vae(seed + 5),
      text_encoder=text_encoder, tokenizer=tiny_pipeline.make_tokenizer(pad_token=tiny_pipeline.EOS),
      text_encoder_2=text_encoder_2, tokenizer_2=tiny_pipeline.make_tokenizer(pad_token="!"),
      text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
  pipe.save_pretrained(folder, safe_serialization=True)
  # The Hub's layouts: CLIP-G's tokenizer as vocab.json + merges.txt, T5's as spiece.model, T5 sharded.
  tiny_pipeline.write_tokenizer_by_hand(os.path.join(folder, "tokenizer_2"), pad_token="!")
  if with_t5:
    shutil.rmtree(os.path.join(folder, "tokenizer_3"))
    tiny_t5.make_tiny_t5_tokenizer(os.path.join(folder, "tokenizer_3"))
    shutil.rmtree(os.path.join(folder, "text_encoder_3"))
    text_encoder_3.save_pretrained(os.path.join(folder, "text_encoder_3"), max_shard_size="20KB")
  # Without T5 the index says [null, null], which from_pretrained reads only when told so.
  absent = {} if with_t5 else dict(text_encoder_3=None, tokenizer_3=None)
  return diffusers.StableDiffusion3Pipeline.from_pretrained(folder, **absent)
