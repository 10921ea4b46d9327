"""One unified student for 1, 2 and 4 steps on a Diffusers UNet (configs/sdxl.py: LoRA, the K table
trained in full), exported so that a stock Diffusers call with only prompts, the step count and the
latents makes our sampler's images."""

import copy
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import SDXL_PROMPTS
import tiny_pipeline

from tdm_jax import main as tdm_main
from tdm_jax.convert import folders
from tdm_jax.convert import pipeline as pipeline_io
from tdm_jax.convert import student as student_io
from tdm_jax.core import lora, sample, train
from tdm_jax.infra import sharding
from tdm_jax.models.vae import AutoencoderKL, VAEConfig
from tdm_jax.convert import unet as unet_io
from tdm_jax.tasks.diffusers import prompts
from tdm_jax.tasks.diffusers import task as diffusers_task
from tdm_jax.tasks.diffusers.description import describe

CHOICES = (1, 2, 4)  # configs/sdxl.py's


def _our_images(config, workdir, task, params, z, num_steps):
  """Our sampler at K = num_steps and the VAE, as images in [0, 1] (NHWC) like Diffusers' "np" output."""
  converted = os.path.join(workdir, "converted")
  files = os.path.join(converted, "pipeline")
  trees = pipeline_io.load_converted(converted)
  side = config.model.resolution
  cond, _ = prompts.PromptEncoder.from_description(describe(files), trees, (side, side))(list(SDXL_PROMPTS))
  latents = sample.student_sample(task.student_apply, params, task.schedule, jnp.asarray(z), cond,
                                  num_steps=num_steps, total_steps=config.tdm.total_steps, step_conditioning=True)
  vae = AutoencoderKL(VAEConfig.from_dict(folders.read_config(os.path.join(files, "vae"))))
  images = np.asarray(vae.images_from_latents(trees["vae"], latents))
  return np.clip(images.transpose(0, 2, 3, 1) / 2 + 0.5, 0, 1)


@pytest.mark.parametrize("lora_rank", [4, 0])
def test_unified_student_and_fake_score_start_equal_to_the_teacher(distilled_sdxl, lora_rank):
  """With LoRA (the K table trained in full beside zero-effect adapters) and as full copies."""
  _, config, workdir, _, _ = distilled_sdxl
  config = copy.deepcopy(config)
  config.model.lora_rank, config.model.lora_alpha = lora_rank, 2.0 * lora_rank
  task = diffusers_task.build_task(config, workdir)
  mesh = sharding.make_mesh(config.mesh.shape)
  with jax.set_mesh(mesh):
    fresh = train.initial_state(task, config, train.plan(task, config, mesh), task.teacher_params)
  table = fresh.student_params[unet_io.STEP_EMBEDDING]["embedding"]
  table = table[lora.FULL] if lora_rank else table
  assert table.shape[0] == max(CHOICES) + 1 and float(jnp.abs(table).max()) == 0.0
  cond, _ = task.conditioning(task.conditioner, task.batch(0, 2))
  x = jax.random.normal(jax.random.key(1), (2, 4, 8, 8))
  t = jnp.array([999, 400])
  nets = task.networks_over(task.teacher_params)  # what the compiled step runs
  teacher = nets.teacher(task.teacher_params, x, t, cond)
  ours = nets.student(fresh.student_params, x, t, cond, num_steps=jnp.full((2,), CHOICES[0]))
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(teacher))  # op by op: bitwise
  student = jax.jit(nets.student)  # compiled, XLA may fuse the added zeros differently: to rounding
  for k in CHOICES:
    for params in (fresh.student_params, fresh.fake_params):
      ours = student(params, x, t, cond, num_steps=jnp.full((2,), k))
      np.testing.assert_allclose(np.asarray(ours), np.asarray(teacher), rtol=1e-5, atol=1e-5)


def test_stock_diffusers_call_makes_our_images_for_every_trained_step_count(distilled_sdxl):
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import StableDiffusionXLPipeline  # pylint: disable=g-import-not-at-top
  _, config, workdir, task, state = distilled_sdxl
  export = os.path.join(workdir, "export")
  assert sorted(n for n in os.listdir(export) if n.startswith("pipeline")) == [f"pipeline_{k}step" for k in CHOICES]
  params = train.sampling_params(task, train.student_params(state))
  z = np.random.default_rng(0).standard_normal((len(SDXL_PROMPTS), 4, 8, 8)).astype(np.float32)
  seen = []
  for k in CHOICES:
    pipe = StableDiffusionXLPipeline.from_pretrained(os.path.join(export, f"pipeline_{k}step"),
                                                     add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(list(SDXL_PROMPTS), num_inference_steps=k, latents=torch.from_numpy(z), output_type="np").images
    assert [int(t) for t in pipe.scheduler.timesteps] == [999 - j * 1000 // k for j in range(k)]
    ours = _our_images(config, workdir, task, params, z, k)
    np.testing.assert_allclose(theirs, ours, atol=2e-4, err_msg=f"K={k}")
    seen.append(ours)
  assert np.abs(seen[0] - seen[-1]).max() > 1e-2  # K matters, so the test could fail


def test_exported_folder_refuses_untrained_counts_and_a_swapped_scheduler(distilled_sdxl, tmp_path):
  _, config, workdir, _, _ = distilled_sdxl
  folder = diffusers_task.exported_pipeline(config, workdir, 2)
  student_io.check_folder(folder, 2)
  with pytest.raises(ValueError, match=r"trained for \[2\] steps, not 4"):
    student_io.check_folder(folder, 4)
  copy = str(tmp_path / "swapped")
  shutil.copytree(folder, copy, symlinks=True)
  path = os.path.join(copy, "scheduler", "scheduler_config.json")
  with open(path, "w") as f:
    json.dump(dict(tiny_pipeline.SDXL_SCHEDULER, _class_name="EulerDiscreteScheduler"), f)
  with pytest.raises(ValueError, match="does not give the student's timesteps"):
    student_io.check_folder(copy, 2)


def test_step_table_folds_into_the_time_embedding_exactly():
  rng = np.random.default_rng(0)
  params = {"time_embedding": {"linear_1": {"kernel": rng.standard_normal((8, 16))},
                               "linear_2": {"kernel": rng.standard_normal((16, 16)), "bias": rng.standard_normal(16)}},
            unet_io.STEP_EMBEDDING: {"embedding": rng.standard_normal((5, 16))}}
  folded, config = unet_io.fold_step_embedding(params, {"num_class_embeds": 5, "sample_size": 8}, 4)
  assert unet_io.STEP_EMBEDDING not in folded and config == {"sample_size": 8}
  want = params["time_embedding"]["linear_2"]["bias"] + params[unet_io.STEP_EMBEDDING]["embedding"][4]
  np.testing.assert_allclose(folded["time_embedding"]["linear_2"]["bias"], want, rtol=1e-6)
  with pytest.raises(ValueError, match="cannot fold K=5"):
    unet_io.fold_step_embedding(params, {}, 5)


def test_a_total_step_count_no_stock_scheduler_reproduces_is_named():
  config = student_io.scheduler_config(tiny_pipeline.SDXL_SCHEDULER)
  assert student_io.mismatched_counts(config, 1000, (1, 2, 4, 5, 8)) == []
  assert student_io.mismatched_counts(config, 1000, (3,)) == [3]  # trailing rounds 666.7 differently
  assert student_io.mismatched_counts(config, 800, (4,)) == [4]


def test_sample_mode_writes_each_samplers_images_and_a_grid(distilled_sdxl):
  _, config, workdir, _, state = distilled_sdxl
  config = copy.deepcopy(config)
  config.sample.teacher_steps = 2
  out = tdm_main.run(config, workdir, "sample", ["a red circle", "green", "a blue square"])
  assert out == os.path.join(workdir, "samples", str(int(state.step)))
  folders_made = sorted(n for n in os.listdir(out) if os.path.isdir(os.path.join(out, n)))
  assert folders_made == ["student_1steps", "student_2steps", "student_4steps", "teacher_2steps"]
  assert all(len(os.listdir(os.path.join(out, n))) == 3 for n in folders_made)
  from PIL import Image  # pylint: disable=g-import-not-at-top
  grid = np.asarray(Image.open(os.path.join(out, "grid.png")))
  # A row per sampler, its name written in a label column to the left of a column per prompt.
  label = grid.shape[1] - (3 * 16 + 2 * 2)
  assert grid.shape[0] == 4 * 16 + 3 * 2 and label > 40
  assert (grid[:16, :label] < 128).any() and (grid[:16, label:label + 16] != 255).any()
  with pytest.raises(ValueError, match="no prompts"):
    tdm_main.run(config, workdir, "sample", [])
  config.sample.student_steps = (8,)
  with pytest.raises(ValueError, match="K <= 4 only"):
    tdm_main.run(config, workdir, "sample", ["green"])
