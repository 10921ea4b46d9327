"""The shipped SD3-style shapes teacher (tdm_jax/assets/shapes_sd3): a real Diffusers StableDiffusion3Pipeline
folder that stock Diffusers samples as our sampler does, and the third main command."""

import os

import jax
import numpy as np
import pytest

from conftest import REPO
from shipped_pipelines import PROMPTS, assert_our_images_match, folder_bytes
from tdm_jax.core.schedules import FlowSchedule, from_diffusers_config
from tdm_jax.infra import data
from tdm_jax.tasks.diffusers.description import describe
from tdm_jax.tasks.diffusers.weights import load_prompt_encoder
from tdm_jax.tasks.shapes import sd3_teacher
from tdm_jax.tasks.shapes import teacher as shapes_teacher

PIPELINE = sd3_teacher.SHIPPED_PIPELINE
T5_TOKENS = 32  # what the teacher was trained at (configs/shapes_sd3_teacher.py, configs/shapes_sd3.py)


def test_shipped_folder_is_a_small_sd3_pipeline():
  size = folder_bytes(PIPELINE)
  assert size <= 25 * 2**20, f"the shipped SD3 pipeline takes {size / 2**20:.1f} MiB"
  d = describe(PIPELINE)
  assert d.pipeline_class == "StableDiffusion3Pipeline" and d.backbone.name == "mmdit" and d.family.name == "sd3"
  assert [s.kind.name for s in d.encoders] == ["clip", "clip", "t5"]
  assert isinstance(from_diffusers_config(d.scheduler_config), FlowSchedule)
  tokenizer = d.encoders[2].kind.load_tokenizer(os.path.join(PIPELINE, "tokenizer_3"))
  for prompt in data.read_prompts(shapes_teacher.SHIPPED_EVAL_PROMPTS):  # every caption fits the trained length
    ids = tokenizer(prompt).input_ids
    assert tokenizer.unk_token_id not in ids and len(ids) < T5_TOKENS, prompt


def test_diffusers_sd3_pipeline_makes_the_images_our_sampler_makes():
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(PIPELINE)
  pipe.set_progress_bar_config(disable=True)
  steps, guidance = 6, 4.0
  z = np.array(jax.random.normal(jax.random.PRNGKey(3), (len(PROMPTS), 4, 8, 8)), np.float32)
  theirs = pipe(PROMPTS, latents=torch.from_numpy(z.copy()), num_inference_steps=steps, guidance_scale=guidance,
                max_sequence_length=T5_TOKENS, output_type="np").images

  encoder = load_prompt_encoder(PIPELINE)
  encoder = type(encoder)(encoder.family.with_max_length(T5_TOKENS), encoder.encoders,
                          encoder.force_zeros_for_empty_prompt, encoder.image_size)
  assert_our_images_match(PIPELINE, theirs, PROMPTS, z, dict(pipe.scheduler.config), encoder=encoder,
                          num_steps=steps, guidance_scale=guidance, solver="euler")


def test_readme_names_the_third_main_command():
  with open(os.path.join(REPO, "README.md")) as f:
    assert "python -m tdm_jax.main --config=configs/shapes_sd3.py --workdir=" in f.read()
