"""Tiny, random Diffusers CogVideoXTransformer3DModels shaped like the published ones (helpers for tests,
no tests here).

CogVideoX-2B: 3-D sin-cos positions added to the video tokens. CogVideoX-5B: 3-D rotary positions on
the video tokens' queries and keys (a head dim that is a multiple of 16, as the rotary table needs).
Every weight is random, norms and biases included (Diffusers' inits would hide mapping mistakes). The
sample size (frames, height, width) differs from the test latents' so that the tables are recomputed
for the actual latent and the rotary grid is placed in a crop region of the base grid.
"""

from __future__ import annotations

import diffusers
import numpy as np
import torch
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

import tiny_pipeline

TEXT = 16  # text_embed_dim (T5-XXL's 4096 in the real models)
BASE = dict(in_channels=4, out_channels=4, time_embed_dim=16, text_embed_dim=TEXT, num_layers=2,
            max_text_seq_length=7, sample_frames=9, sample_height=8, sample_width=12, patch_size=2,
            temporal_compression_ratio=4, flip_sin_to_cos=True, freq_shift=0, attention_bias=True,
            norm_elementwise_affine=True, norm_eps=1e-5, spatial_interpolation_scale=1.875,
            temporal_interpolation_scale=1.0, patch_bias=True)
VARIANTS = {
    "2b": dict(BASE, num_attention_heads=2, attention_head_dim=8, use_rotary_positional_embeddings=False),
    "5b": dict(BASE, num_attention_heads=2, attention_head_dim=16, use_rotary_positional_embeddings=True),
}
FRAMES, HEIGHT, WIDTH = 3, 6, 4  # latent frames (9 video frames at temporal compression 4), a non-square frame


def random_transformer(kwargs, seed=0) -> diffusers.CogVideoXTransformer3DModel:
  """A Diffusers CogVideoXTransformer3DModel of `kwargs` with every parameter random (norm scales around 1)."""
  torch.manual_seed(seed)
  model = diffusers.CogVideoXTransformer3DModel(**kwargs).eval()
  tiny_pipeline._randomise(model)  # pylint: disable=protected-access
  return model


def state_dict(model) -> dict:
  return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def inputs(kwargs, frames=FRAMES, height=HEIGHT, width=WIDTH, seed=0, length=7, timestep=(999.0, 321.5)):
  """(hidden_states (2, F, C, H, W), timestep (2,), encoder_hidden_states (2, length, text_embed_dim))."""
  rng = np.random.default_rng(seed)
  video = rng.standard_normal((2, frames, kwargs["in_channels"], height, width)).astype(np.float32)
  text = rng.standard_normal((2, length, kwargs["text_embed_dim"])).astype(np.float32)
  t = np.asarray(timestep)
  return video, t.astype(np.int64 if np.issubdtype(t.dtype, np.integer) else np.float32), text


def pipeline_rotary(config, frames, height, width):
  """The (cos, sin) table CogVideoXPipeline._prepare_rotary_positional_embeddings passes the transformer
  for latents of (frames, height, width), rebuilt from Diffusers' own functions."""
  p = config["patch_size"]
  grid_h, grid_w = height // p, width // p  # the pipeline's (pixels // (vae scale * patch))
  region = get_resize_crop_region_for_grid((grid_h, grid_w), config["sample_width"] // p,
                                           config["sample_height"] // p)
  return get_3d_rotary_pos_embed(embed_dim=config["attention_head_dim"], crops_coords=region,
                                 grid_size=(grid_h, grid_w), temporal_size=frames)


def run_diffusers(model, video, t, text) -> np.ndarray:
  config = model.config
  rotary = None
  if config.use_rotary_positional_embeddings:
    rotary = pipeline_rotary(config, *video.shape[1:2], *video.shape[3:])
  with torch.no_grad():
    return model(torch.from_numpy(video), encoder_hidden_states=torch.from_numpy(text),
                 timestep=torch.from_numpy(t), image_rotary_emb=rotary).sample.numpy()
