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
from tdm_jax.core.schedules import make_schedule
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
  config.vae.block_out_channels = (8, 16)  # two resolutions, one layer each: a short compile
  config.unet.num_iterations = 2
  config.unet.batch_size = 2
  config.unet.block_out_channels = (8, 16)
  config.unet.layers_per_block = 1
  config.unet.attention_heads = (1, 2)
  config.unet.transformer_layers_per_block = (1, 1)
  config.unet.norm_num_groups = 4
  config.text.num_hidden_layers = 1
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
  unet = folders.read_config(folders.component_path(out, "unet"))
  assert (unet["block_out_channels"], unet["layers_per_block"], unet["sample_size"]) == ([8, 16], 1, 16)
  assert folders.read_config(folders.component_path(out, "text_encoder_2"))["num_hidden_layers"] == 1
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


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_loss_is_the_x0_error_weighted_by_clipped_snr(prediction_type):
  """The min-SNR-gamma objective, whatever the prediction type, equals the x0 error weighted by
  min(SNR, gamma); without gamma (None, or 0 as configs write it) the loss is the plain mean squared error."""
  schedule = make_schedule(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, prediction_type=prediction_type)
  x0 = jax.random.normal(jax.random.key(0), (16, 3, 4, 4))
  apply = lambda params, x_t, t, cond: params * x_t  # any output: the identity below is exact
  key, gamma = jax.random.key(1), 5.0
  t_key, n_key, _ = jax.random.split(key, 3)
  t = jax.random.randint(t_key, (16,), 0, schedule.num_train_timesteps)
  eps = jax.random.normal(n_key, x0.shape)
  x_t = schedule.add_noise(x0, eps, t)
  x0_error = jnp.mean((schedule.to_x0(0.3 * x_t, x_t, t) - x0) ** 2, axis=(1, 2, 3))
  expected = jnp.mean(x0_error * jnp.minimum(schedule.snr(t), gamma))
  cond = {"caption": jnp.zeros((16, 2))}
  got = pretrain.denoising_loss(0.3, apply, schedule, x0, cond, cond, key, 0.0, min_snr_gamma=gamma)
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  assert jnp.any(schedule.snr(t) > gamma) and jnp.any(schedule.snr(t) < gamma)  # both branches drawn
  plain = jnp.mean((0.3 * x_t - schedule.from_x0_eps(x0, eps, t)) ** 2)
  np.testing.assert_allclose(pretrain.denoising_loss(0.3, apply, schedule, x0, cond, cond, key, 0.0), plain, rtol=1e-6)
  np.testing.assert_allclose(pretrain.denoising_loss(0.3, apply, schedule, x0, cond, cond, key, 0.0, min_snr_gamma=0.0),
                             plain, rtol=1e-6)


def _tiny_transformer_teacher(config, workdir: str, check) -> None:
  """Runs a transformer teacher's config through the CLI entry with a 1-block, width-16 transformer for
  2 iterations at batch 2, calls `check(pipeline_folder)`, then runs it again: it resumes and trains nothing."""
  config.transformer.num_iterations = 2
  config.transformer.batch_size = 2
  config.transformer.num_layers = 1
  config.transformer.num_attention_heads = 2
  config.transformer.attention_head_dim = 8
  config.train.progress = False
  out = tdm_main.run(config, workdir, "pretrain")
  assert out == os.path.join(workdir, "pipeline")
  check(out)
  logged = open(os.path.join(workdir, "denoiser", "metrics.jsonl")).read()
  assert tdm_main.run(config, workdir, "pretrain") == out  # finished stages are not trained again
  assert open(os.path.join(workdir, "denoiser", "metrics.jsonl")).read() == logged


def test_pixart_pretrain_mode_makes_a_pixart_folder(tmp_path):
  """The transformer teacher's config, tiny and short (min-SNR weighting on): a PixArtAlphaPipeline folder
  whose transformer started from PixArt-alpha's init."""
  from configs import shapes_pixart_teacher as teacher_config  # pylint: disable=g-import-not-at-top
  config = teacher_config.get_config()
  config.transformer.min_snr_gamma = 5.0
  config.text.num_layers = 1
  config.text.tokenizer_captions = 2000

  def check(out):
    assert folders.read_model_index(out)["_class_name"] == "PixArtAlphaPipeline"
    transformer = folders.read_config(folders.component_path(out, "transformer"))
    assert (transformer["num_layers"], transformer["attention_head_dim"]) == (1, 8)
    state = folders.load_state_dict(folders.component_path(out, "transformer"))
    # Two Adam steps at lr <= 5e-4 / 200 from PixArt-alpha's zero-initialised output projection.
    assert 0 < np.abs(state["proj_out.weight"]).max() < 1e-4

  _tiny_transformer_teacher(config, str(tmp_path / "pixart_teacher"), check)


def test_sd3_pretrain_mode_makes_an_sd3_folder(tmp_path):
  """The flow-matching teacher's config, tiny and short: a StableDiffusion3Pipeline folder on the other
  teachers' frozen encoders (the first CLIP given an identity projection) and VAE (shift_factor 0)."""
  from configs import shapes_sd3_teacher as teacher_config  # pylint: disable=g-import-not-at-top

  def check(out):
    assert folders.read_model_index(out)["_class_name"] == "StableDiffusion3Pipeline"
    transformer = folders.read_config(folders.component_path(out, "transformer"))
    assert (transformer["num_layers"], transformer["caption_projection_dim"], transformer["qk_norm"]) == (1, 16, "rms_norm")
    assert folders.read_config(folders.component_path(out, "vae"))["shift_factor"] == 0.0
    clip = folders.load_state_dict(folders.component_path(out, "text_encoder"))
    np.testing.assert_array_equal(clip["text_projection.weight"], np.eye(clip["text_projection.weight"].shape[0]))
    shipped_clip = folders.load_state_dict(folders.component_path(shapes_teacher.SHIPPED_PIPELINE, "text_encoder"))
    for name, value in shipped_clip.items():  # frozen: the shipped encoder's weights, unchanged
      np.testing.assert_array_equal(clip[name], value, err_msg=name)

  _tiny_transformer_teacher(teacher_config.get_config(), str(tmp_path / "sd3_teacher"), check)
