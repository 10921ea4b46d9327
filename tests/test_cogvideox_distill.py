"""CogVideoX end to end on a tiny random CogVideoX-2B-shaped folder in the real layout: configs/cogvideox_2b.py's
LoRA student distilled for 1, 2 and 4 steps on video latents, exported as `CogVideoXPipeline` folders that a
stock call samples right (guidance off, the run's size passed) and as LoRA files that the teacher's own
pipeline loads."""

import copy
import importlib.util
import json
import os

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
from tdm_jax.tasks.diffusers import prompts, task as diffusers_task  # pylint: disable=g-import-not-at-top,wrong-import-position
from tdm_jax.tasks.diffusers.description import describe  # pylint: disable=g-import-not-at-top,wrong-import-position

import tiny_cogvideox_pipeline  # pylint: disable=g-import-not-at-top,wrong-import-order,wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a small red circle moving right on a white background", "a photo of a cat"]
T5_TOKENS = tiny_cogvideox_pipeline.TEXT_TOKENS  # the transformer's max_text_seq_length: the family's length
SIZE = dict(height=tiny_cogvideox_pipeline.HEIGHT, width=tiny_cogvideox_pipeline.WIDTH,
            num_frames=tiny_cogvideox_pipeline.FRAMES)


def _recipe():
  spec = importlib.util.spec_from_file_location("cogvideox_2b_config", os.path.join(REPO, "configs", "cogvideox_2b.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
  root = tmp_path_factory.mktemp("cogvideox_run")
  folder = str(root / "pipeline")
  tiny_cogvideox_pipeline.make_tiny_cogvideox_pipeline(folder)
  prompt_file = root / "prompts.txt"
  prompt_file.write_text("\n".join(PROMPTS) + "\n")
  config = _recipe()
  config.teacher.pipeline = folder
  config.data.prompt_source = str(prompt_file)
  config.model.dtype = config.model.teacher_dtype = "float32"
  config.model.remat = False
  config.model.lora_rank, config.model.lora_alpha = 4, 8.0
  config.tdm.step_choices = (1, 2, 4)
  config.optim.student_lr = 1e-2  # large, so that two iterations move the adapters visibly
  config.optim.student_warmup_steps = 0
  config.optim.lr_scales = (("^step_embedding/", 10.0),)
  config.train.batch_size = jax.device_count()
  config.train.num_iterations = 2
  config.train.checkpoint_every = 2
  config.train.progress = False
  config.train.evaluate_after = False
  workdir = str(root / "work")
  state = tdm_main.run(config, workdir, "train")
  return config, workdir, state


def test_the_task_trains_on_video_latents(distilled):
  config, workdir, state = distilled
  task = diffusers_task.build_task(copy.deepcopy(config), workdir)
  assert task.sample_shape == (3, 4, 4, 6)  # (latent frames, channels, height, width)
  assert task.schedule.prediction_type == "v_prediction" and float(task.schedule.alphas_cumprod[-1]) == 0.0
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  assert rows and all(np.isfinite(r["generator_loss"]) for r in rows if "generator_loss" in r)
  pairs, full = lora.split_full(train.student_params(state))
  assert "step_embedding" in {p[0] for p in full}
  kernels = lora.adapter_items(pairs)
  assert len(kernels) == 2 * 4 and all(p[1] == "attn1" for p in kernels)  # to_q/k/v/out of both blocks


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # PEFT's note on a second adapter
def test_exports_sample_right_in_stock_cogvideox_calls(distilled):
  config, workdir, state = distilled
  task = diffusers_task.build_task(copy.deepcopy(config), workdir)
  params = train.sampling_params(task, train.student_params(state))
  converted = os.path.join(workdir, "converted")
  trees = pipeline_io.load_converted(converted)
  d = describe(os.path.join(converted, "pipeline"))
  assert dict(d.family.stock_call)["max_sequence_length"] == T5_TOKENS
  cond, _ = prompts.PromptEncoder.from_description(d, trees)(PROMPTS)
  z = np.random.default_rng(0).standard_normal((2,) + task.sample_shape).astype(np.float32)
  latents = {}
  for k in (1, 2, 4):
    export = os.path.join(workdir, "export", f"pipeline_{k}step")
    scheduler = folders.read_config(os.path.join(export, "scheduler"))
    assert scheduler["_class_name"] == "CogVideoXDDIMScheduler" and scheduler["snr_shift_scale"] == 3.0
    with open(os.path.join(export, student_io.METADATA)) as f:
      assert "guidance_scale=1.0" in json.load(f)["guidance"]
    assert student_io.stock_call_extra(export, k) == SIZE  # the family's stock call passes the T5 length
    ours = sample.student_sample(task.student_apply, params, task.schedule, jnp.asarray(z), cond, num_steps=k,
                                 total_steps=1000, step_conditioning=True)
    pipe = diffusers.CogVideoXPipeline.from_pretrained(export)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
      theirs = pipe(PROMPTS, num_inference_steps=k, guidance_scale=1.0, use_dynamic_cfg=False,
                    max_sequence_length=T5_TOKENS, latents=torch.from_numpy(z), output_type="latent", **SIZE).frames
    np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), atol=2e-4, err_msg=f"K={k}")
    np.testing.assert_array_equal(pipe.scheduler.timesteps.numpy(), [999, 749, 499, 249][::4 // k][:k])
    student_io.check_folder(export, k)
    latents[k] = theirs.numpy()
  assert np.abs(latents[1] - latents[4]).mean() > 1e-3  # each K's row of the step table is its own

  # The LoRA files in the teacher's own pipeline make the merged folders' latents.
  teacher = diffusers.CogVideoXPipeline.from_pretrained(config.teacher.pipeline)
  teacher.set_progress_bar_config(disable=True)
  teacher.scheduler = diffusers.CogVideoXDDIMScheduler.from_pretrained(
      os.path.join(workdir, "export", "pipeline_4step"), subfolder="scheduler")
  teacher.load_lora_weights(os.path.join(workdir, "export", "lora"), adapter_name="tdm")
  for k in (1, 2, 4):
    teacher.load_lora_weights(os.path.join(workdir, "export", f"lora_{k}step"), adapter_name=f"tdm_{k}step")
  for k in (1, 2, 4):
    teacher.set_adapters(["tdm", f"tdm_{k}step"])
    with torch.no_grad():
      theirs = teacher(PROMPTS, num_inference_steps=k, guidance_scale=1.0, use_dynamic_cfg=False,
                       max_sequence_length=T5_TOKENS, latents=torch.from_numpy(z), output_type="latent",
                       **SIZE).frames
    np.testing.assert_allclose(theirs.numpy(), latents[k], atol=2e-4, err_msg=f"LoRA files, K={k}")


def test_sample_and_evaluate_write_videos(distilled):
  """`--mode=sample` writes an MP4 per prompt and sampler and an animated grid; the evaluation table has our
  samplers' rows and the exported pipelines' stock rows (equal clips), with MP4 and GIF grids."""
  import imageio.v3 as iio  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  config, workdir, _ = distilled
  config = copy.deepcopy(config)
  config.sample.student_steps = (1, 4)
  config.sample.teacher_steps = 2
  out = tdm_main.run(config, workdir, "sample", prompts=PROMPTS)
  for slug in ("student_1steps", "student_4steps", "teacher_2steps"):
    clip = iio.imread(os.path.join(out, slug, "001.mp4"))
    assert clip.shape[0] == tiny_cogvideox_pipeline.FRAMES and clip.shape[-1] == 3, slug
  grid = Image.open(os.path.join(out, "grid.gif"))
  assert grid.n_frames == tiny_cogvideox_pipeline.FRAMES
  config.eval.num_samples = 2
  config.eval.teacher_steps = (2,)
  config.eval.student_steps = (1, 4)
  rows = tdm_main.run(config, workdir, "evaluate")
  by_name = {r["sampler"]: r for r in rows}
  assert set(by_name) >= {"TDM student, 4 steps", "exported pipeline in stock Diffusers, 4 steps"}
  for row in rows:
    assert row["grid"].endswith(".gif") and os.path.exists(os.path.join(workdir, row["grid"]))
    assert os.path.exists(os.path.join(workdir, row["grid"][:-4] + ".mp4"))
  assert Image.open(os.path.join(workdir, "eval", "comparison.gif")).n_frames == tiny_cogvideox_pipeline.FRAMES
  # Our student's clips and the stock pipeline's are the same (decoded, uint8).
  ours = iio.imread(os.path.join(workdir, "eval", "student_4nfe.mp4"))
  theirs = iio.imread(os.path.join(workdir, "eval", "diffusers_4nfe.mp4"))
  assert np.abs(ours.astype(int) - theirs.astype(int)).mean() < 2.0
