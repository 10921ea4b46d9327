"""`tdm_jax.tasks.diffusers.prompts` equals Diffusers' pipelines on tiny random SDXL and SD 1.5 folders.

Prompt -> embeddings (both encoders, pooled, negatives, zeros for empty negatives), SDXL's
add_time_ids, and one UNet call on the embeddings, all against the pipeline's own code.
"""

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from tdm_jax.convert import folders  # pylint: disable=g-import-not-at-top
from tdm_jax.convert.unet import unet_params_from_state_dict  # pylint: disable=g-import-not-at-top
from tdm_jax.models.unet import UNet2DConditionModel, UNetConfig  # pylint: disable=g-import-not-at-top
from tdm_jax.tasks.diffusers import text_encoders  # pylint: disable=g-import-not-at-top
from tdm_jax.tasks.diffusers.backbones.unet import sdxl_time_ids  # pylint: disable=g-import-not-at-top
from tdm_jax.tasks.diffusers.weights import load_prompt_encoder  # pylint: disable=g-import-not-at-top

import tiny_pipeline  # pylint: disable=g-import-not-at-top,wrong-import-order

PROMPTS = tiny_pipeline.PROMPTS
NEGATIVES = ["blurry", "", "a red square on black"]
NEGATIVE_ERRORS = {}


def _close(name, ours, theirs, tol=1e-4):
  ours = np.asarray(ours, np.float64)
  theirs = np.asarray(theirs.detach().cpu().numpy() if hasattr(theirs, "detach") else theirs, np.float64)
  assert ours.shape == theirs.shape, (name, ours.shape, theirs.shape)
  err = float(np.max(np.abs(ours - theirs)))
  scale = max(1.0, float(np.max(np.abs(theirs))))
  print(f"{name}: max|ours - theirs| = {err:.3e}, max|theirs| = {float(np.max(np.abs(theirs))):.3f}")
  assert err <= tol * scale, (name, err, scale)
  return err


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("tiny_sdxl"))
  return folder, tiny_pipeline.make_tiny_sdxl_pipeline(folder)


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("tiny_sd15"))
  return folder, tiny_pipeline.make_tiny_sd_pipeline(folder)


@pytest.fixture(scope="module")
def sdxl_encoder(sdxl):
  return load_prompt_encoder(sdxl[0])


# ----------------------------------------------------------------------------- the folder itself


def test_tokenizers_load_both_ways(sdxl):
  """tokenizer/ as save_pretrained wrote it, tokenizer_2/ as vocab.json + merges.txt by hand."""
  folder, pipe = sdxl
  assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= set(os.listdir(os.path.join(folder, "tokenizer_2")))
  reference = tiny_pipeline.make_tokenizer()
  want = reference(PROMPTS, padding="max_length", max_length=tiny_pipeline.MAX_LENGTH, truncation=True).input_ids
  for name in ("tokenizer", "tokenizer_2"):
    ours = text_encoders.load_clip_tokenizer(os.path.join(folder, name))
    theirs = getattr(pipe, name)
    assert ours.model_max_length == theirs.model_max_length == tiny_pipeline.MAX_LENGTH, name
    got = ours(PROMPTS, padding="max_length", max_length=tiny_pipeline.MAX_LENGTH, truncation=True).input_ids
    assert got == theirs(PROMPTS, padding="max_length", max_length=tiny_pipeline.MAX_LENGTH,
                         truncation=True).input_ids, name
    # Same words -> same tokens up to the end token; only the padding differs ("!" for tokenizer_2).
    for row_got, row_want in zip(got, want):
      end = row_want.index(reference.eos_token_id) + 1
      assert row_got[:end] == row_want[:end], name
    # The vocabulary really is used (no unknown tokens): "red" is one merged token.
    assert ours.tokenize("a red circle")[:2] == ["a</w>", "red</w>"], name
  pad_2 = text_encoders.load_clip_tokenizer(os.path.join(folder, "tokenizer_2")).pad_token
  assert pad_2 == "!"


def test_encoder_kinds(sdxl, sdxl_encoder, sd15):
  assert sdxl_encoder.kind == "sdxl" and len(sdxl_encoder.encoders) == 2
  assert sdxl_encoder.force_zeros_for_empty_prompt
  assert [e.module.config.with_projection for e in sdxl_encoder.encoders] == [False, True]
  assert sdxl_encoder.image_size == (16, 16)  # unet sample_size 8 * vae scale factor 2
  sd = load_prompt_encoder(sd15[0])
  assert sd.kind == "sd" and len(sd.encoders) == 1 and not sd.force_zeros_for_empty_prompt


# ----------------------------------------------------------------------------- SDXL prompt path


def _diffusers_sdxl(pipe, prompts, negatives=None):
  with torch.no_grad():
    return pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True,
                              negative_prompt=negatives)


def _diffusers_time_ids(pipe, batch):
  size = pipe.default_sample_size * pipe.vae_scale_factor
  ids = pipe._get_add_time_ids((size, size), (0, 0), (size, size), dtype=torch.float32,  # pylint: disable=protected-access
                               text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
  return ids.repeat(batch, 1)


def test_sdxl_prompt_embeddings_zero_negatives(sdxl, sdxl_encoder):
  _, pipe = sdxl
  embeds, neg_embeds, pooled, neg_pooled = _diffusers_sdxl(pipe, PROMPTS)
  cond, uncond = sdxl_encoder(PROMPTS)
  assert cond["encoder_hidden_states"].shape == (len(PROMPTS), tiny_pipeline.MAX_LENGTH, 96)
  assert cond["text_embeds"].shape == (len(PROMPTS), 32)
  _close("sdxl encoder_hidden_states", cond["encoder_hidden_states"], embeds)
  _close("sdxl text_embeds", cond["text_embeds"], pooled)
  # force_zeros_for_empty_prompt and no negative prompt: both are zeros, in ours and theirs.
  assert not torch.any(neg_embeds) and not torch.any(neg_pooled)
  np.testing.assert_array_equal(np.asarray(uncond["encoder_hidden_states"]), 0.0)
  np.testing.assert_array_equal(np.asarray(uncond["text_embeds"]), 0.0)
  assert uncond["encoder_hidden_states"].shape == cond["encoder_hidden_states"].shape
  np.testing.assert_array_equal(np.asarray(uncond["time_ids"]), np.asarray(cond["time_ids"]))


def test_sdxl_prompt_embeddings_explicit_negatives(sdxl, sdxl_encoder):
  _, pipe = sdxl
  embeds, neg_embeds, pooled, neg_pooled = _diffusers_sdxl(pipe, PROMPTS, NEGATIVES)
  cond, uncond = sdxl_encoder(PROMPTS, negative_prompts=NEGATIVES)
  _close("sdxl encoder_hidden_states", cond["encoder_hidden_states"], embeds)
  _close("sdxl text_embeds", cond["text_embeds"], pooled)
  assert torch.any(neg_embeds) and torch.any(neg_pooled)
  _close("sdxl negative encoder_hidden_states", uncond["encoder_hidden_states"], neg_embeds)
  _close("sdxl negative text_embeds", uncond["text_embeds"], neg_pooled)
  # An explicit "" is encoded, not zeroed (Diffusers zeros only when negative_prompt is None).
  assert np.any(np.asarray(uncond["encoder_hidden_states"][1]))
  with pytest.raises(ValueError, match="negative prompts"):
    sdxl_encoder(PROMPTS, negative_prompts=NEGATIVES[:2])


def test_sdxl_add_time_ids(sdxl, sdxl_encoder):
  _, pipe = sdxl
  cond, _ = sdxl_encoder(PROMPTS)
  theirs = _diffusers_time_ids(pipe, len(PROMPTS)).numpy()
  assert cond["time_ids"].dtype == np.float32
  np.testing.assert_array_equal(np.asarray(cond["time_ids"]), theirs)
  np.testing.assert_array_equal(theirs[0], [16, 16, 0, 0, 16, 16])
  np.testing.assert_array_equal(sdxl_time_ids(1, (768, 512), (16, 32), (1024, 1024)),
                                [[768, 512, 16, 32, 1024, 1024]])
  # Another image size gives the pipeline's time ids for that size.
  big = dataclasses.replace(sdxl_encoder, image_size=(1024, 768))
  theirs = pipe._get_add_time_ids((1024, 768), (0, 0), (1024, 768), dtype=torch.float32,  # pylint: disable=protected-access
                                  text_encoder_projection_dim=32).repeat(len(PROMPTS), 1)
  np.testing.assert_array_equal(np.asarray(big(PROMPTS)[0]["time_ids"]), theirs.numpy())


def test_image_size_argument(sdxl):
  encoder = load_prompt_encoder(sdxl[0], image_size=(1024, 1024))
  assert encoder.image_size == (1024, 1024)


def test_single_string_prompts(sdxl, sdxl_encoder):
  """A str is one prompt (not one prompt per character); a str negative applies to every prompt."""
  _, pipe = sdxl
  embeds, neg_embeds, pooled, neg_pooled = _diffusers_sdxl(pipe, PROMPTS[0], "blurry")
  cond, uncond = sdxl_encoder(PROMPTS[0], negative_prompts="blurry")
  assert cond["encoder_hidden_states"].shape[0] == 1
  _close("sdxl str prompt", cond["encoder_hidden_states"], embeds)
  _close("sdxl str negative", uncond["text_embeds"], neg_pooled)
  _, uncond = sdxl_encoder(PROMPTS, negative_prompts="blurry")
  assert uncond["encoder_hidden_states"].shape[0] == len(PROMPTS)
  _close("sdxl broadcast negative", uncond["encoder_hidden_states"][0], neg_embeds[0])
  _close("sdxl broadcast negative", uncond["encoder_hidden_states"][2], neg_embeds[0])


def test_sdxl_refiner_style_folder(sdxl, tmp_path):
  """No text_encoder/tokenizer (as in the SDXL refiner): only text_encoder_2, as Diffusers does then."""
  folder, pipe = sdxl
  folder = _copy(folder, tmp_path, "refiner")
  _edit_index(folder, text_encoder=[None, None], tokenizer=[None, None])
  shutil.rmtree(os.path.join(folder, "text_encoder"))
  shutil.rmtree(os.path.join(folder, "tokenizer"))
  encoder = load_prompt_encoder(folder)
  assert encoder.kind == "sdxl" and len(encoder.encoders) == 1
  refiner = diffusers.StableDiffusionXLPipeline(
      vae=pipe.vae, text_encoder=None, tokenizer=None, text_encoder_2=pipe.text_encoder_2,
      tokenizer_2=pipe.tokenizer_2, unet=pipe.unet, scheduler=pipe.scheduler, force_zeros_for_empty_prompt=True,
      add_watermarker=False)
  embeds, _, pooled, _ = _diffusers_sdxl(refiner, PROMPTS)
  cond, _ = encoder(PROMPTS)
  assert cond["encoder_hidden_states"].shape[-1] == 64
  _close("refiner encoder_hidden_states", cond["encoder_hidden_states"], embeds)
  _close("refiner text_embeds", cond["text_embeds"], pooled)


# ----------------------------------------------------------------------------- one UNet call


def _our_unet(folder):
  unet_dir = folders.component_path(folder, "unet")
  config = UNetConfig.from_dict(folders.read_config(unet_dir))
  params = unet_params_from_state_dict(folders.load_state_dict(unet_dir), config)
  return UNet2DConditionModel(config), params


def _latents(pipe, batch, seed=0):
  rng = np.random.default_rng(seed)
  size = pipe.unet.config.sample_size
  latents = rng.standard_normal((batch, pipe.unet.config.in_channels, size, size)).astype(np.float32)
  return latents, np.array([999, 421, 17][:batch], np.int64)


def _unet_call(model, params, latents, t, cond):
  added = {k: cond[k] for k in ("text_embeds", "time_ids") if k in cond} or None
  fn = jax.jit(lambda p, x, t, c, a: model.apply({"params": p}, x, t, c, added_cond_kwargs=a))
  return np.asarray(fn(params, latents, t, cond["encoder_hidden_states"], added))


def test_sdxl_unet_call(sdxl, sdxl_encoder):
  folder, pipe = sdxl
  model, params = _our_unet(folder)
  latents, t = _latents(pipe, len(PROMPTS))
  cond, uncond = sdxl_encoder(PROMPTS, negative_prompts=NEGATIVES)
  embeds, neg_embeds, pooled, neg_pooled = _diffusers_sdxl(pipe, PROMPTS, NEGATIVES)
  time_ids = _diffusers_time_ids(pipe, len(PROMPTS))
  # Classifier-free guidance batch, as the pipeline builds it: [uncond, cond].
  both = {k: np.concatenate([np.asarray(uncond[k]), np.asarray(cond[k])]) for k in cond}
  x, tt = np.concatenate([latents, latents]), np.concatenate([t, t])
  with torch.no_grad():
    theirs = pipe.unet(torch.from_numpy(x), torch.from_numpy(tt),
                       encoder_hidden_states=torch.cat([neg_embeds, embeds]),
                       added_cond_kwargs={"text_embeds": torch.cat([neg_pooled, pooled]),
                                          "time_ids": torch.cat([time_ids, time_ids])}).sample
  ours = _unet_call(model, params, x, tt, both)
  _close("sdxl unet", ours, theirs)
  # The conditioning matters: cond and uncond halves differ.
  assert float(np.max(np.abs(ours[:3] - ours[3:]))) > 1e-3


# ----------------------------------------------------------------------------- SD 1.5


def test_sd15_prompt_embeddings_and_unet_call(sd15):
  folder, pipe = sd15
  encoder = load_prompt_encoder(folder)
  with torch.no_grad():
    embeds, neg_embeds = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                            do_classifier_free_guidance=True)
    embeds_n, neg_embeds_n = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                                do_classifier_free_guidance=True, negative_prompt=NEGATIVES)
  cond, uncond = encoder(PROMPTS)
  assert set(cond) == {"encoder_hidden_states"}
  _close("sd15 encoder_hidden_states", cond["encoder_hidden_states"], embeds)
  _close("sd15 negative ('') encoder_hidden_states", uncond["encoder_hidden_states"], neg_embeds)
  assert torch.any(neg_embeds)  # SD 1.5 encodes "" rather than zeroing it
  cond_n, uncond_n = encoder(PROMPTS, negative_prompts=NEGATIVES)
  _close("sd15 encoder_hidden_states", cond_n["encoder_hidden_states"], embeds_n)
  _close("sd15 negative encoder_hidden_states", uncond_n["encoder_hidden_states"], neg_embeds_n)

  model, params = _our_unet(folder)
  latents, t = _latents(pipe, len(PROMPTS), seed=1)
  with torch.no_grad():
    theirs = pipe.unet(torch.from_numpy(latents), torch.from_numpy(t), encoder_hidden_states=embeds).sample
  _close("sd15 unet", _unet_call(model, params, latents, t, cond), theirs)


# ----------------------------------------------------------------------------- errors


def _edit_index(folder, **entries):
  path = os.path.join(folder, folders.MODEL_INDEX)
  with open(path) as f:
    index = json.load(f)
  index.update(entries)
  with open(path, "w") as f:
    json.dump(index, f)


def _copy(folder, tmp_path, name):
  dst = str(tmp_path / name)
  shutil.copytree(folder, dst)
  return dst


def test_missing_text_encoder_2(sdxl, tmp_path):
  folder = _copy(sdxl[0], tmp_path, "no_te2")
  shutil.rmtree(os.path.join(folder, "text_encoder_2"))
  with pytest.raises(folders.FolderError, match="text_encoder_2"):
    load_prompt_encoder(folder)


def test_tokenizer_without_vocab(sdxl, tmp_path):
  for name, files in (("tokenizer", ("tokenizer.json",)), ("tokenizer_2", ("vocab.json",))):
    folder = _copy(sdxl[0], tmp_path, f"no_vocab_{name}")
    for f in files:
      os.remove(os.path.join(folder, name, f))
    path = os.path.join(folder, name)
    with pytest.raises(folders.FolderError) as e:
      load_prompt_encoder(folder)
    assert path in str(e.value), str(e.value)


def test_missing_tokenizer_folder(sd15, tmp_path):
  folder = _copy(sd15[0], tmp_path, "no_tok")
  shutil.rmtree(os.path.join(folder, "tokenizer"))
  with pytest.raises(folders.FolderError, match="tokenizer"):
    load_prompt_encoder(folder)


def test_sdxl_index_without_text_encoder_2(sdxl, tmp_path):
  """model_index.json lists text_encoder_2 as null: no pooled embedding, an error at load naming it."""
  folder = _copy(sdxl[0], tmp_path, "null_te2")
  _edit_index(folder, text_encoder_2=[None, None])
  with pytest.raises(folders.FolderError, match="text_encoder_2"):
    load_prompt_encoder(folder)
