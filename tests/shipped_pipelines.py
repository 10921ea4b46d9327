"""Our sampler and VAE on a shipped Diffusers folder, beside what its stock pipeline returned: the check
every shipped teacher's test makes (tests/test_shapes_*.py)."""

import os

import numpy as np

from tdm_jax.core import sample
from tdm_jax.core.schedules import from_diffusers_config
from tdm_jax.tasks.diffusers.description import describe
from tdm_jax.tasks.diffusers.weights import convert_pipeline, load_prompt_encoder

# Two captions the shipped teachers' tests sample: one object, and two with different colours and sizes.
PROMPTS = ["a small red circle in the top left on a white background",
           "a large blue square in the center and a small yellow triangle in the bottom right on a gray background"]


def folder_bytes(folder: str) -> int:
  """Every file's size under `folder`, summed (the shipped assets' 25 MB budget)."""
  return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(folder) for f in files)


def assert_our_images_match(pipeline: str, theirs, prompts, z, scheduler_config: dict, *, encoder=None, **sampler):
  """Samples `prompts` from noise `z` with our converted weights (`sampler`: teacher_sample's keywords) and
  checks the [0, 1] images against the stock pipeline's `output_type="np"` ones."""
  d = describe(pipeline)
  trees = convert_pipeline(pipeline)
  cond, uncond = (encoder or load_prompt_encoder(pipeline))(prompts)
  model = d.backbone.module(d.denoiser_config)
  latents = sample.teacher_sample(d.backbone.apply_fn(model), trees[d.denoiser],
                                  from_diffusers_config(scheduler_config), z, cond, uncond, **sampler)
  ours = np.clip(np.asarray(d.decoder()(trees["vae"], latents))
                 .transpose(0, 2, 3, 1) / 2 + 0.5, 0, 1)
  assert ours.shape == theirs.shape == (len(prompts), 32, 32, 3)
  np.testing.assert_allclose(ours, theirs, atol=2e-3)
  assert np.abs(theirs[0] - theirs[1]).mean() > 0.05  # the prompts make different images
