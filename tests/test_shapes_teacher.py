"""The teacher-making mode: the checkpointed loop, the VAE loss, and a tiny run of every stage."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO  # noqa: F401 (puts the repo on sys.path)
from tdm_jax import main as tdm_main
from tdm_jax.convert import folders
from tdm_jax.core import pretrain
from tdm_jax.infra import data, metrics
from tdm_jax.tasks.shapes import data as shapes_data
from tdm_jax.tasks.shapes import evaluator
from tdm_jax.tasks.shapes import teacher as shapes_teacher


def _regression(workdir, num_iterations, poison_at=None):
  """A least-squares fit through `pretrain.fit`; batches are a function of the iteration only."""
  target = jnp.arange(4.0)

  def step_fn(state, batch, step):
    grad = 2 * (state["w"] * batch - target) * batch
    w = state["w"] - 0.05 * grad
    if poison_at is not None:
      w = jnp.where(step + 1 >= poison_at, jnp.nan, w)
    return {"w": w}, {"loss": jnp.mean((w * batch - target)**2)}

  batch_fn = lambda step: np.full((4,), 1.0 + 0.1 * (step % 3), np.float32)
  return pretrain.fit(jax.jit(step_fn), lambda: {"w": jnp.zeros(4)}, batch_fn, num_iterations=num_iterations,
                      workdir=str(workdir), checkpoint_every=2, log_every=1, progress=False)


def test_fit_resumes_to_the_uninterrupted_result(tmp_path):
  straight = _regression(tmp_path / "straight", 6)
  _regression(tmp_path / "resumed", 3)  # stops after 3: checkpoints at 2 and 3
  resumed = _regression(tmp_path / "resumed", 6)
  np.testing.assert_array_equal(straight["w"], resumed["w"])
  steps = [r["step"] for r in metrics.read_jsonl(str(tmp_path / "resumed" / "metrics.jsonl"))]
  assert steps == [1, 2, 3, 4, 5, 6]  # the resumed run logs each iteration once


def test_fit_stops_on_nan_and_keeps_the_last_checkpoint(tmp_path):
  with pytest.raises(FloatingPointError, match=r"iteration 5.*last checkpoint \(4\)"):
    _regression(tmp_path, 8, poison_at=5)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]


def test_object_mask_and_weighted_vae_loss():
  images, _, _ = shapes_data.batch(0, 0, 8)
  x = jnp.asarray(shapes_data.images_to_float(images))
  mask = np.asarray(shapes_teacher.object_mask(x))[:, 0]
  assert 0.01 < mask.mean() < 0.2 and (mask[:, :2, :2] == 0).all()
  # The mask covers the objects: where it is 0, the image is its background colour.
  background = np.asarray(x)[:, :, :1, :1]
  assert np.abs((np.asarray(x) - background) * (1 - mask[:, None])).max() < 0.05


def test_pretrain_mode_makes_a_diffusers_folder(tmp_path):
  """Every stage, tiny and short, through the CLI entry; then the same command again resumes."""
  from configs import shapes_teacher as teacher_config  # pylint: disable=g-import-not-at-top
  config = teacher_config.get_config()
  config.vae.num_iterations = 2
  config.vae.batch_size = 2
  config.unet.num_iterations = 2
  config.unet.batch_size = 2
  config.unet.block_out_channels = (8, 16, 16)
  config.unet.norm_num_groups = 4
  config.evaluator.num_iterations = 2
  config.evaluator.batch_size = 8
  config.evaluator.held_out = 8
  config.prompts.num_train = 10
  config.prompts.num_eval = 3
  config.train.progress = False
  workdir = str(tmp_path / "teacher")
  out = tdm_main.run(config, workdir, "pretrain")
  assert out == os.path.join(workdir, "pipeline")
  index = folders.read_model_index(out)
  assert index["_class_name"] == "StableDiffusionXLPipeline"
  assert folders.read_config(folders.component_path(out, "unet"))["block_out_channels"] == [8, 16, 16]
  assert folders.read_config(folders.component_path(out, "vae"))["scaling_factor"] > 0
  assert len(data.read_prompts(os.path.join(workdir, "prompts_eval.txt"))) == 3
  _, meta = evaluator.load_classifier(os.path.join(workdir, "evaluator"))
  assert meta["train_steps"] == 2
  mtime = os.path.getmtime(os.path.join(workdir, "evaluator", evaluator.WEIGHTS_FILE))
  assert tdm_main.run(config, workdir, "pretrain") == out  # finished stages are not trained again
  assert os.path.getmtime(os.path.join(workdir, "evaluator", evaluator.WEIGHTS_FILE)) == mtime


def test_pretrain_mode_only_for_the_teacher_task(tmp_path):
  from configs import shapes  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="--mode=pretrain"):
    tdm_main.run(shapes.get_config(), str(tmp_path), "pretrain")
