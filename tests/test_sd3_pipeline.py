"""SD3 / SD3.5 end to end on a tiny random SD3.5-Medium-shaped folder in the real layout: a LoRA student
distilled in rectified-flow form for 1, 2 and 4 steps (configs/sd35_medium.py's recipe) and exported as
pipeline folders that a stock `StableDiffusion3Pipeline` call samples right (the student's sigmas passed,
guidance off), and bad input refused in one line that names the problem."""

import copy
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from tdm_jax import main as tdm_main  # pylint: disable=g-import-not-at-top,wrong-import-position
from tdm_jax.convert import folders  # pylint: disable=g-import-not-at-top,wrong-import-position
from tdm_jax.convert import pipeline as pipeline_io  # pylint: disable=g-import-not-at-top,wrong-import-position
from tdm_jax.convert import student as student_io  # pylint: disable=g-import-not-at-top,wrong-import-position
from tdm_jax.core import lora, sample, train  # pylint: disable=g-import-not-at-top,wrong-import-position
from tdm_jax.core.schedules import FlowSchedule  # pylint: disable=g-import-not-at-top,wrong-import-position
from tdm_jax.infra.errors import ConfigError  # pylint: disable=g-import-not-at-top,wrong-import-position
from tdm_jax.tasks.diffusers import prompts, task as diffusers_task  # pylint: disable=g-import-not-at-top,wrong-import-position
from tdm_jax.tasks.diffusers.description import describe  # pylint: disable=g-import-not-at-top,wrong-import-position

import tiny_sd3  # pylint: disable=g-import-not-at-top,wrong-import-order,wrong-import-position

PROMPTS = ["a small red circle in the top left on a white background", "two squares and one circle"]


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("tiny_sd3"))
  tiny_sd3.make_tiny_sd3_pipeline(folder, variant="sd35_medium")
  return folder


def _config(folder, prompt_file):
  """configs/sd35_medium.py on the tiny folder: 16 px, float32, a LoRA student for 1, 2 and 4 steps."""
  from configs import sd35_medium  # pylint: disable=g-import-not-at-top
  config = sd35_medium.get_config()
  config.teacher.pipeline = folder
  config.data.prompt_source = str(prompt_file)
  config.model.resolution = 16
  config.model.dtype = config.model.teacher_dtype = "float32"
  config.model.remat = False
  config.model.lora_rank, config.model.lora_alpha = 4, 8.0
  config.model.max_sequence_length = 12  # T5 tokens (SD3's 256 by default): exports record it for stock calls
  config.tdm.step_choices = (1, 2, 4)
  config.optim.student_lr = 1e-2  # large, so that two iterations move the adapters visibly
  config.optim.student_warmup_steps = 0
  config.optim.lr_scales = (("^step_embedding/", 10.0),)
  config.train.batch_size = jax.device_count()
  config.train.num_iterations = 2
  config.train.checkpoint_every = 2
  config.train.progress = False
  config.train.evaluate_after = False
  return config


@pytest.fixture(scope="module")
def distilled(sd3, tmp_path_factory):
  root = tmp_path_factory.mktemp("sd3_run")
  prompt_file = root / "prompts.txt"
  prompt_file.write_text("\n".join(PROMPTS) + "\n")
  config = _config(sd3, prompt_file)
  workdir = str(root / "work")
  state = tdm_main.run(config, workdir, "train")
  return config, workdir, state


def test_the_task_trains_on_the_flow_grid(distilled):
  config, workdir, state = distilled
  task = diffusers_task.build_task(copy.deepcopy(config), workdir)
  assert isinstance(task.schedule, FlowSchedule) and task.schedule.shift == 3.0 and task.schedule.mu is None
  assert task.sample_shape == (16, 8, 8)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  assert rows and all(np.isfinite(r["generator_loss"]) and np.isfinite(r["fake_loss"]) for r in rows if "fake_loss" in r)
  pairs, full = lora.split_full(train.student_params(state))
  assert pairs and "step_embedding" in {p[0] for p in full}  # adapters plus the unified K table


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # PEFT's note on a second adapter
def test_distilled_student_samples_right_in_a_stock_sd3_call(distilled):
  config, workdir, state = distilled
  task = diffusers_task.build_task(copy.deepcopy(config), workdir)
  params = train.sampling_params(task, train.student_params(state))
  converted = os.path.join(workdir, "converted")
  trees = pipeline_io.load_converted(converted)
  d = describe(os.path.join(converted, "pipeline"))
  cond, _ = prompts.PromptEncoder.from_description(d, trees, (16, 16), max_length=12)(PROMPTS)
  assert cond["encoder_hidden_states"].shape == (2, tiny_sd3.tiny_pipeline.MAX_LENGTH + 12, tiny_sd3.JOINT_DIM)
  decode = jax.jit(d.decoder())
  z = np.random.default_rng(0).standard_normal((2, 16, 8, 8)).astype(np.float32)
  images = {}
  for k in (1, 2, 4):
    export = os.path.join(workdir, "export", f"pipeline_{k}step")
    scheduler = folders.read_config(os.path.join(export, "scheduler"))
    assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler" and scheduler["shift"] == 3.0
    assert not scheduler["use_dynamic_shifting"]
    latents = sample.student_sample(task.student_apply, params, task.schedule, jnp.asarray(z), cond, num_steps=k,
                                    total_steps=1000, step_conditioning=True)
    ours = np.clip(np.asarray(decode(trees["vae"], latents)).transpose(0, 2, 3, 1) / 2 + 0.5, 0, 1)
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(export)  # the README's stock call, exactly
    pipe.set_progress_bar_config(disable=True)
    sigmas = [(k - j) / k for j in range(k)]
    assert student_io.stock_call_extra(export, k) == {"sigmas": sigmas, "max_sequence_length": 12}
    theirs = pipe(PROMPTS, num_inference_steps=k, sigmas=sigmas, guidance_scale=1.0, max_sequence_length=12,
                  latents=torch.from_numpy(z), output_type="np").images
    np.testing.assert_allclose(ours, theirs, atol=2e-3, err_msg=f"K={k}")
    np.testing.assert_allclose(pipe.scheduler.timesteps.numpy(), [1000, 900, 750, 500][:1] if k == 1 else
                               {2: [1000, 750], 4: [1000, 900, 750, 500]}[k], rtol=1e-5)
    student_io.check_folder(export, k)
    images[k] = theirs
  assert np.abs(images[1] - images[4]).mean() > 1e-3  # each K's row of the step table is its own

  # The LoRA files in the teacher's own pipeline (the README's call) make the merged folders' images.
  teacher = diffusers.StableDiffusion3Pipeline.from_pretrained(config.teacher.pipeline)
  teacher.set_progress_bar_config(disable=True)
  teacher.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(
      os.path.join(workdir, "export", "pipeline_4step"), subfolder="scheduler")
  teacher.load_lora_weights(os.path.join(workdir, "export", "lora"), adapter_name="tdm")
  for k in (1, 2, 4):
    teacher.load_lora_weights(os.path.join(workdir, "export", f"lora_{k}step"), adapter_name=f"tdm_{k}step")
  for k in (1, 2, 4):
    teacher.set_adapters(["tdm", f"tdm_{k}step"])
    theirs = teacher(PROMPTS, num_inference_steps=k, sigmas=[(k - j) / k for j in range(k)], guidance_scale=1.0,
                     max_sequence_length=12, latents=torch.from_numpy(z), output_type="np").images
    np.testing.assert_allclose(theirs, images[k], atol=2e-3, err_msg=f"LoRA files, K={k}")


def test_a_swapped_scheduler_is_caught(distilled, tmp_path):
  _, workdir, _ = distilled
  export = str(tmp_path / "swapped")
  shutil.copytree(os.path.join(workdir, "export", "pipeline_4step"), export, symlinks=True)
  path = os.path.join(export, "scheduler", "scheduler_config.json")
  with open(path) as f:
    config = json.load(f)
  os.remove(path)  # a link to the first export's file when shared: replace, never write through
  with open(path, "w") as f:
    json.dump({**config, "shift": 1.0}, f)
  with pytest.raises(ConfigError, match=r"does not give the student's timesteps"):
    student_io.check_folder(export, 4)
  with pytest.raises(ConfigError, match="trained for \\[4\\] steps, not 3"):
    student_io.check_folder(export, 3)


def test_bad_flow_scheduler_configs_are_refused_in_one_line(sd3, tmp_path):
  config = _config(sd3, tmp_path / "none.txt")
  for key, value in (("use_karras_sigmas", True), ("invert_sigmas", True), ("time_shift_type", "cubic")):
    bad = str(tmp_path / key)
    shutil.copytree(sd3, bad)
    path = os.path.join(bad, "scheduler", "scheduler_config.json")
    with open(path) as f:
      entries = json.load(f)
    with open(path, "w") as f:
      json.dump({**entries, key: value}, f)
    config.teacher.pipeline = bad
    with pytest.raises(ConfigError, match=key) as err:
      diffusers_task.build_task(copy.deepcopy(config), str(tmp_path / f"work_{key}"))
    assert "\n" not in str(err.value)
