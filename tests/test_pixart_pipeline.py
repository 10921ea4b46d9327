"""PixArt end to end on tiny random PixArt folders in the real layout: prompts encoded as Diffusers'
`encode_prompt` encodes them, a LoRA student distilled for 1, 2 and 4 steps (configs/pixart_alpha.py's
recipe, S = 900) and exported as pipeline folders that a stock `PixArtAlphaPipeline` call samples right,
and bad input refused in one line that names the problem."""

import copy
import json
import logging
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
from tdm_jax.core import sample, train  # pylint: disable=g-import-not-at-top,wrong-import-position
from tdm_jax.infra.errors import ConfigError  # pylint: disable=g-import-not-at-top,wrong-import-position
from tdm_jax.tasks.diffusers import prompts, task as diffusers_task  # pylint: disable=g-import-not-at-top,wrong-import-position
from tdm_jax.tasks.diffusers.description import describe  # pylint: disable=g-import-not-at-top,wrong-import-position
from tdm_jax.tasks.diffusers.weights import load_prompt_encoder  # pylint: disable=g-import-not-at-top,wrong-import-position

import tiny_pixart  # pylint: disable=g-import-not-at-top,wrong-import-order,wrong-import-position

PROMPTS = ["a small red circle in the top left on a white background", "two squares and one circle"]
LONG = " ".join(["a large blue square in the center on a gray background"] * 20)  # far over 120 tokens


@pytest.fixture(scope="module")
def pixart(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("tiny_pixart"))
  return folder, tiny_pixart.make_tiny_pixart_pipeline(folder)


def _close(ours, theirs, tol=1e-5):
  theirs = theirs.detach().float().numpy() if hasattr(theirs, "detach") else np.asarray(theirs)
  ours = np.asarray(ours, np.float64)
  assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
  err = float(np.max(np.abs(ours - theirs)))
  assert err <= tol * max(1.0, float(np.max(np.abs(theirs)))), err
  return err


def test_prompts_are_encoded_as_encode_prompt_does(pixart, caplog):
  folder, pipe = pixart
  encoder = load_prompt_encoder(folder)
  assert encoder.kind == "pixart" and encoder.family.max_length == 120
  batch = PROMPTS + [LONG]
  with caplog.at_level(logging.WARNING):
    cond, uncond = encoder(batch)
  truncated = [r for r in caplog.records if "truncated" in r.getMessage()]
  assert len(truncated) == 1 and "120 tokens" in truncated[0].getMessage()
  with torch.no_grad():
    embeds, mask, neg_embeds, neg_mask = pipe.encode_prompt(batch, do_classifier_free_guidance=True, negative_prompt="",
                                                            device="cpu", clean_caption=False)
  assert cond["encoder_hidden_states"].shape == (3, 120, 32)
  np.testing.assert_array_equal(np.asarray(cond["encoder_attention_mask"]), mask.numpy())
  np.testing.assert_array_equal(np.asarray(uncond["encoder_attention_mask"]), neg_mask.numpy())
  assert 1 < int(mask[0].sum()) < 120 and int(mask[2].sum()) == 120 and int(neg_mask[0].sum()) == 1
  _close(cond["encoder_hidden_states"], embeds)
  _close(uncond["encoder_hidden_states"], neg_embeds)
  np.testing.assert_array_equal(np.asarray(cond["resolution"]), [[16, 16]] * 3)


def _config(folder, prompt_file):
  """configs/pixart_alpha.py on the tiny folder: 16 px, float32, a LoRA student for 1, 2 and 4 steps."""
  from configs import pixart_alpha  # pylint: disable=g-import-not-at-top
  config = pixart_alpha.get_config()
  config.teacher.pipeline = folder
  config.data.prompt_source = str(prompt_file)
  config.model.resolution = 16
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
  return config


def test_distilled_student_samples_right_in_a_stock_pixart_call(pixart, tmp_path):
  folder, _ = pixart
  prompt_file = tmp_path / "prompts.txt"
  prompt_file.write_text("\n".join(PROMPTS) + "\n")
  config = _config(folder, prompt_file)
  workdir = str(tmp_path / "work")
  state = tdm_main.run(config, workdir, "train")
  task = diffusers_task.build_task(config, workdir)
  params = train.sampling_params(task, train.student_params(state))
  converted = os.path.join(workdir, "converted")
  trees = pipeline_io.load_converted(converted)
  d = describe(os.path.join(converted, "pipeline"))
  cond, _ = prompts.PromptEncoder.from_description(d, trees, (16, 16))(PROMPTS)
  decode = jax.jit(d.decoder())
  z = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
  images = {}
  for k in (1, 2, 4):
    export = os.path.join(workdir, "export", f"pipeline_{k}step")
    scheduler = folders.read_config(os.path.join(export, "scheduler"))
    assert scheduler["_class_name"] == "DDIMScheduler" and scheduler["num_train_timesteps"] == 900
    latents = sample.student_sample(task.student_apply, params, task.schedule, jnp.asarray(z), cond, num_steps=k,
                                    total_steps=900, step_conditioning=True)
    ours = np.clip(np.asarray(decode(trees["vae"], latents)).transpose(0, 2, 3, 1) / 2 + 0.5, 0, 1)
    pipe = diffusers.PixArtAlphaPipeline.from_pretrained(export)  # the README's stock call, exactly
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(PROMPTS, num_inference_steps=k, guidance_scale=1.0, use_resolution_binning=False,
                  clean_caption=False, latents=torch.from_numpy(z), output_type="np").images
    np.testing.assert_allclose(ours, theirs, atol=2e-3, err_msg=f"K={k}")
    assert list(pipe.scheduler.timesteps.numpy()) == [899 - j * 900 // k for j in range(k)]
    images[k] = theirs
  assert np.abs(images[1] - images[4]).mean() > 1e-3  # each K's row of the step table is its own
  assert not os.path.exists(os.path.join(workdir, "export", "lora"))  # PixArt pipelines load no LoRA files


def _copy(folder, tmp_path, name):
  dst = str(tmp_path / name)
  shutil.copytree(folder, dst)
  return dst


def _edit_json(path, **entries):
  with open(path) as f:
    content = json.load(f)
  content.update(entries)
  with open(path, "w") as f:
    json.dump(content, f)


def test_bad_pixart_folders_are_refused_in_one_line(pixart, tmp_path):
  folder, _ = pixart
  unknown = _copy(folder, tmp_path, "unknown_class")
  _edit_json(os.path.join(unknown, "model_index.json"), transformer=["diffusers", "FluxTransformer2DModel"])
  with pytest.raises(ConfigError, match="FluxTransformer2DModel.*supported denoisers: CogVideoXTransformer3DModel, "
                                        "PixArtTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel"):
    describe(unknown)
  shard = _copy(folder, tmp_path, "missing_shard")
  os.remove(os.path.join(shard, "text_encoder", "model-00002-of-00005.safetensors"))
  with pytest.raises(folders.FolderError, match="model-00002-of-00005.safetensors"):
    load_prompt_encoder(shard)
  no_tokenizer = _copy(folder, tmp_path, "no_spiece")
  os.remove(os.path.join(no_tokenizer, "tokenizer", "spiece.model"))
  with pytest.raises(folders.FolderError, match="spiece.model"):
    load_prompt_encoder(no_tokenizer)
  extra_key = _copy(folder, tmp_path, "extra_key")
  _edit_json(os.path.join(extra_key, "transformer", "config.json"), use_rope=True)
  with pytest.raises(ConfigError, match="use_rope"):
    describe(extra_key)


def test_a_resolution_off_the_patch_grid_is_refused_before_anything_compiles(pixart, tmp_path):
  folder, _ = pixart
  config = _config(folder, tmp_path / "none.txt")
  config.model.resolution = 18  # VAE factor 2 x patch size 2: multiples of 4 only
  with pytest.raises(ConfigError, match="model.resolution=18 must be a positive multiple of 4"):
    diffusers_task.build_task(copy.deepcopy(config), str(tmp_path / "work"))
