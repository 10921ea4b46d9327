"""Tiny, random Diffusers text-to-image pipelines (SDXL and SD 1.5) saved as real pipeline folders.

Helpers for tests, no tests here. Every weight is randomised (Diffusers zero-initialises some
layers, e.g. attention `proj_out` and `conv_out`, which would hide mapping mistakes).

The SDXL folder is written both ways a tokenizer can be stored: `tokenizer/` by Transformers'
own `save_pretrained` (Transformers 5 may write only tokenizer.json), `tokenizer_2/` by hand as
vocab.json + merges.txt + tokenizer_config.json, the layout of the real SDXL folders on the Hub.
"""

from __future__ import annotations

import json
import os
import shutil
import string

import torch
import diffusers
import transformers

MAX_LENGTH = 16
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
PROMPTS = ["a red circle on white background", "a blue square", "green"]

# SDXL's scheduler config (stabilityai/stable-diffusion-xl-base-1.0/scheduler), as EulerDiscreteScheduler reads it.
SDXL_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", interpolation_type="linear", use_karras_sigmas=False,
    steps_offset=1, timestep_spacing="leading")
SD15_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1)


# The smallest AutoencoderKL config the VAE tests build in Diffusers (two blocks, four groups).
TINY_VAE = dict(
    in_channels=3, out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4,
    sample_size=16,
)


def tiny_vocab():
  """(vocab dict, merges list of pairs): lowercase letters and "!", each also word-final, a few merges."""
  chars = list(string.ascii_lowercase) + ["!"]
  vocab = {}
  for c in chars:
    vocab[c] = len(vocab)
  for c in chars:
    vocab[c + "</w>"] = len(vocab)
  merges = [("r", "e"), ("re", "d</w>"), ("o", "n</w>"), ("a", "r"), ("i", "r"), ("w", "h")]
  for a, b in merges:
    vocab[a + b] = len(vocab)
  vocab[BOS] = len(vocab)
  vocab[EOS] = len(vocab)
  return vocab, merges


def make_tokenizer(pad_token=EOS) -> transformers.CLIPTokenizer:
  vocab, merges = tiny_vocab()
  return transformers.CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_LENGTH, unk_token=EOS,
                                    bos_token=BOS, eos_token=EOS, pad_token=pad_token)


def write_tokenizer_by_hand(path, pad_token="!") -> None:
  """vocab.json + merges.txt + tokenizer_config.json, as the tokenizers in real SDXL folders are stored."""
  if os.path.isdir(path):
    shutil.rmtree(path)
  os.makedirs(path)
  vocab, merges = tiny_vocab()
  with open(os.path.join(path, "vocab.json"), "w", encoding="utf-8") as f:
    json.dump(vocab, f)
  with open(os.path.join(path, "merges.txt"), "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  config = dict(tokenizer_class="CLIPTokenizer", model_max_length=MAX_LENGTH, bos_token=BOS, eos_token=EOS,
                unk_token=EOS, pad_token=pad_token, do_lower_case=True, errors="replace",
                add_prefix_space=False, clean_up_tokenization_spaces=True)
  with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2)


def _randomise(module: torch.nn.Module, scale: float = 0.1) -> None:
  """Every parameter random: norm scales around 1, everything else around 0."""
  with torch.no_grad():
    for name, p in module.named_parameters():
      is_norm_scale = p.ndim == 1 and name.endswith("weight")
      p.copy_(torch.randn_like(p) * scale + (1.0 if is_norm_scale else 0.0))


def _text_encoder(cls, hidden, pad_token, seed, num_hidden_layers=3, **extra):
  vocab, _ = tiny_vocab()
  config = transformers.CLIPTextConfig(
      vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_hidden_layers,
      num_attention_heads=4, max_position_embeddings=MAX_LENGTH, bos_token_id=vocab[BOS],
      eos_token_id=vocab[EOS], pad_token_id=vocab[pad_token], **extra)
  torch.manual_seed(seed)
  model = cls(config).eval()
  _randomise(model)
  return model


def _vae(seed):
  torch.manual_seed(seed)
  vae = diffusers.AutoencoderKL(
      in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
      up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
      latent_channels=4, norm_num_groups=8, sample_size=16, scaling_factor=0.13025).eval()
  _randomise(vae)
  return vae


def make_tiny_sdxl_pipeline(folder, seed=0, transformer_depth=(1, 2), text_layers=3) -> diffusers.StableDiffusionXLPipeline:
  """A complete tiny random SDXL pipeline saved to `folder` (safetensors) and read back from it.

  `transformer_depth`: transformer blocks per down block (SDXL's varies per block; (1, 1) compiles faster).
  One entry makes a UNet of one resolution, a cross-attention block (compiles faster still).
  `text_layers`: layers of each CLIP text encoder.
  """
  folder = os.fspath(folder)
  text_encoder = _text_encoder(transformers.CLIPTextModel, 32, EOS, seed + 1,  # ViT-L-like: quick_gelu
                               num_hidden_layers=text_layers)
  text_encoder_2 = _text_encoder(transformers.CLIPTextModelWithProjection, 64, "!", seed + 2,
                                 num_hidden_layers=text_layers, hidden_act="gelu", projection_dim=32)  # bigG-like
  torch.manual_seed(seed + 3)
  if len(transformer_depth) == 1:
    blocks = dict(block_out_channels=(32,), down_block_types=("CrossAttnDownBlock2D",),
                  up_block_types=("CrossAttnUpBlock2D",), attention_head_dim=(2,))
  else:
    blocks = dict(block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4))
  unet = diffusers.UNet2DConditionModel(
      sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, **blocks,
      cross_attention_dim=32 + 64, norm_num_groups=8, use_linear_projection=True,
      transformer_layers_per_block=tuple(transformer_depth), addition_embed_type="text_time", addition_time_embed_dim=8,
      projection_class_embeddings_input_dim=32 + 6 * 8).eval()
  _randomise(unet)
  pipe = diffusers.StableDiffusionXLPipeline(
      vae=_vae(seed + 4), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
      tokenizer=make_tokenizer(pad_token=EOS), tokenizer_2=make_tokenizer(pad_token="!"), unet=unet,
      scheduler=diffusers.EulerDiscreteScheduler(**SDXL_SCHEDULER), force_zeros_for_empty_prompt=True,
      add_watermarker=False)
  pipe.save_pretrained(folder, safe_serialization=True)
  write_tokenizer_by_hand(os.path.join(folder, "tokenizer_2"), pad_token="!")
  return diffusers.StableDiffusionXLPipeline.from_pretrained(folder,
                                                             add_watermarker=False)


def make_tiny_sd_pipeline(folder, seed=0) -> diffusers.StableDiffusionPipeline:
  """A complete tiny random SD 1.5-style pipeline (one encoder) saved to `folder` and read back."""
  folder = os.fspath(folder)
  text_encoder = _text_encoder(transformers.CLIPTextModel, 32, EOS, seed + 1)
  torch.manual_seed(seed + 3)
  unet = diffusers.UNet2DConditionModel(
      # One resolution keeps our UNet's compile short; the parity tests cover deeper UNets.
      sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32,), layers_per_block=1,
      down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
      attention_head_dim=8, cross_attention_dim=32, norm_num_groups=8).eval()
  _randomise(unet)
  pipe = diffusers.StableDiffusionPipeline(
      vae=_vae(seed + 4), text_encoder=text_encoder, tokenizer=make_tokenizer(), unet=unet,
      scheduler=diffusers.DDIMScheduler(**SD15_SCHEDULER), safety_checker=None, feature_extractor=None,
      requires_safety_checker=False)
  pipe.save_pretrained(folder, safe_serialization=True)
  return diffusers.StableDiffusionPipeline.from_pretrained(folder,
                                                           safety_checker=None, requires_safety_checker=False)


def tiny_sdxl_config(pipeline_dir, prompt_file):
  """configs/sdxl.py pointed at a tiny pipeline folder: 16 px, float32, no remat, no warm-up, one batch
  row per device of the default mesh, no progress bar."""
  import jax  # pylint: disable=g-import-not-at-top
  from configs import sdxl  # pylint: disable=g-import-not-at-top
  config = sdxl.get_config()
  config.teacher.pipeline = str(pipeline_dir)
  config.data.prompt_source = str(prompt_file)
  config.model.resolution = 16
  config.model.dtype = "float32"
  config.model.teacher_dtype = "float32"
  config.model.remat = False
  config.optim.student_warmup_steps = 0
  config.train.batch_size = jax.device_count()
  config.train.progress = False
  return config
