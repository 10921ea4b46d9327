"""The shipped shapes teacher (tdm_jax/assets/shapes): a real Diffusers SDXL folder, its evaluator,
and the README's main command, shortened."""

import os

import jax
import numpy as np
import pytest

from conftest import REPO
from shipped_pipelines import PROMPTS, assert_our_images_match, folder_bytes
from tdm_jax.convert import folders
from tdm_jax.infra import data
from tdm_jax.tasks.diffusers import text_encoders
from tdm_jax.tasks.shapes import data as shapes_data
from tdm_jax.tasks.shapes import evaluator
from tdm_jax.tasks.shapes import teacher as shapes_teacher

PIPELINE = shapes_teacher.SHIPPED_PIPELINE


def test_shipped_folder_is_a_small_sdxl_pipeline():
  size = folder_bytes(shapes_teacher.ASSETS)
  assert size <= 25 * 2**20, f"shipped assets take {size / 2**20:.1f} MiB"
  index = folders.read_model_index(PIPELINE)
  assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"]
  unet = folders.read_config(folders.component_path(PIPELINE, "unet"))
  assert unet["addition_embed_type"] == "text_time"
  for name in ("tokenizer", "tokenizer_2"):  # the Transformers tokenizer format, one token per caption word
    tokenizer = text_encoders.load_clip_tokenizer(folders.component_path(PIPELINE, name))
    ids = tokenizer(PROMPTS[1]).input_ids
    assert len(ids) == len(PROMPTS[1].split()) + 2 and tokenizer.unk_token_id not in ids[1:-1]
  assert len(data.read_prompts(shapes_teacher.SHIPPED_TRAIN_PROMPTS)) >= 1000
  for prompt in data.read_prompts(shapes_teacher.SHIPPED_EVAL_PROMPTS):
    shapes_data.parse_caption(prompt)  # every evaluation prompt is a caption the evaluator can score


@pytest.mark.parametrize("scheduler", ["DDIMScheduler", "DPMSolverMultistepScheduler"])
def test_diffusers_pipeline_makes_the_images_our_sampler_makes(scheduler):
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(PIPELINE, add_watermarker=False)
  scheduler_config = dict(pipe.scheduler.config)
  pipe.scheduler = getattr(diffusers, scheduler).from_config(scheduler_config)
  pipe.set_progress_bar_config(disable=True)
  steps, guidance = 6, 4.0
  z = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (len(PROMPTS), 4, 8, 8)), np.float32)
  theirs = pipe(PROMPTS, latents=torch.from_numpy(z.copy()), num_inference_steps=steps, guidance_scale=guidance,
                output_type="np").images

  solver = "ddim" if scheduler == "DDIMScheduler" else "dpm_solver_2m"
  # The shipped config says set_alpha_to_one=false: Diffusers' DDIM ends on timestep 0, not on x0.
  final = 0 if solver == "ddim" else -1
  assert_our_images_match(PIPELINE, theirs, PROMPTS, z, scheduler_config, num_steps=steps, guidance_scale=guidance,
                          solver=solver, spacing="leading", steps_offset=1, final_timestep=final)


def test_shipped_evaluator_is_honest():
  """On real images of held-out captions the shipped classifier agrees; shuffled captions collapse."""
  images, captions, _ = shapes_data.batch(7, 0, 256)
  score = evaluator.PromptScorer(shapes_teacher.SHIPPED_EVALUATOR, captions)
  real = score(images)
  assert real["adherence"] >= 0.95 and real["fd"] < 1e-6  # the real images of the prompts are these images
  shuffled = evaluator.PromptScorer(shapes_teacher.SHIPPED_EVALUATOR, list(np.random.default_rng(0).permutation(captions)))
  assert shuffled(images)["adherence"] < 0.2
  # Two real samples of other captions are far closer than one of them with its colour channels swapped.
  a, b = (evaluator.features(score.params, shapes_data.batch(seed, 0, 512)[0]) for seed in (8, 9))
  swapped = evaluator.features(score.params, shapes_data.batch(8, 0, 512)[0][..., ::-1])
  assert 3 * evaluator.frechet_distance(a, b) < evaluator.frechet_distance(swapped, b)


def test_readme_names_the_main_command():
  """The README's main command; tests/test_launch.py runs it (configs/shapes.py through `main.run`,
  shortened) inside the Colab notebook and checks its table, grids and exports."""
  with open(os.path.join(REPO, "README.md")) as f:
    assert "pip install -e . && python -m tdm_jax.main --config=configs/shapes.py --workdir=" in f.read()
