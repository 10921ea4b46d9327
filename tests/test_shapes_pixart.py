"""The shipped PixArt-style shapes teacher (tdm_jax/assets/shapes_pixart): a real Diffusers
PixArtAlphaPipeline folder that stock Diffusers samples as our sampler does, and the second main command."""

import os

import jax
import numpy as np
import pytest

from conftest import REPO
from shipped_pipelines import PROMPTS, assert_our_images_match, folder_bytes
from tdm_jax.infra import data
from tdm_jax.tasks.diffusers.description import describe
from tdm_jax.tasks.shapes import pixart_teacher
from tdm_jax.tasks.shapes import teacher as shapes_teacher

PIPELINE = pixart_teacher.SHIPPED_PIPELINE


def test_shipped_folder_is_a_small_pixart_pipeline():
  size = folder_bytes(PIPELINE)
  assert size <= 25 * 2**20, f"the shipped PixArt pipeline takes {size / 2**20:.1f} MiB"
  d = describe(PIPELINE)
  assert d.pipeline_class == "PixArtAlphaPipeline" and d.backbone.name == "pixart" and d.family.max_length == 120
  assert [s.kind.name for s in d.encoders] == ["t5"]
  assert set(os.listdir(os.path.join(PIPELINE, "tokenizer"))) >= {"spiece.model", "tokenizer_config.json"}
  tokenizer = d.encoders[0].kind.load_tokenizer(os.path.join(PIPELINE, "tokenizer"))
  for prompt in data.read_prompts(shapes_teacher.SHIPPED_EVAL_PROMPTS):  # every caption word is in the vocabulary
    assert tokenizer.unk_token_id not in tokenizer(prompt).input_ids, prompt
  assert d.scheduler_config["_class_name"] == "DPMSolverMultistepScheduler"
  assert d.scheduler_config["beta_schedule"] == "linear"


@pytest.mark.parametrize("scheduler", ["DDIMScheduler", "DPMSolverMultistepScheduler"])
def test_diffusers_pixart_pipeline_makes_the_images_our_sampler_makes(scheduler):
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  pipe = diffusers.PixArtAlphaPipeline.from_pretrained(PIPELINE)
  scheduler_config = dict(pipe.scheduler.config)
  overrides = dict(timestep_spacing="trailing", **({"clip_sample": False} if scheduler == "DDIMScheduler" else {}))
  pipe.scheduler = getattr(diffusers, scheduler).from_config(scheduler_config, **overrides)
  pipe.set_progress_bar_config(disable=True)
  steps, guidance = 5, 4.0  # a step count that divides 1000: Diffusers' DDIM lands where "trailing" starts the next
  z = np.array(jax.random.normal(jax.random.PRNGKey(3), (len(PROMPTS), 4, 8, 8)), np.float32)
  theirs = pipe(PROMPTS, latents=torch.from_numpy(z.copy()), num_inference_steps=steps, guidance_scale=guidance,
                use_resolution_binning=False, clean_caption=False, output_type="np").images

  solver = "ddim" if scheduler == "DDIMScheduler" else "dpm_solver_2m"
  assert_our_images_match(PIPELINE, theirs, PROMPTS, z, scheduler_config, num_steps=steps, guidance_scale=guidance,
                          solver=solver, spacing="trailing")


def test_readme_names_the_second_main_command():
  with open(os.path.join(REPO, "README.md")) as f:
    assert "python -m tdm_jax.main --config=configs/shapes_pixart.py --workdir=" in f.read()
