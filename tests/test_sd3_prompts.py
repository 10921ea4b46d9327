"""SD3 prompt encoding equals `StableDiffusion3Pipeline.encode_prompt` on tiny random SD3 folders in the
real layout: CLIP-L and CLIP-G penultimate states zero-padded to T5's width and followed by T5's states,
pooled projections of both CLIPs, negatives "" encoded through every encoder, T5's zeros when the folder
has no text_encoder_3, truncation of long prompts, and a shorter max_sequence_length; `describe` reads
such folders and refuses a CLIP without projection in one line naming it.
"""

import json
import logging
import os
import shutil

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from tdm_jax.convert import folders  # pylint: disable=g-import-not-at-top,wrong-import-position
from tdm_jax.infra.errors import ConfigError  # pylint: disable=g-import-not-at-top,wrong-import-position
from tdm_jax.tasks.diffusers import backbones, prompts, text_encoders  # pylint: disable=g-import-not-at-top
from tdm_jax.tasks.diffusers.backbones.mmdit import SD3  # pylint: disable=g-import-not-at-top
from tdm_jax.tasks.diffusers.backbones.pixart import PIXART_SIGMA  # pylint: disable=g-import-not-at-top
from tdm_jax.tasks.diffusers.backbones.unet import SD, SDXL  # pylint: disable=g-import-not-at-top
from tdm_jax.tasks.diffusers.description import describe  # pylint: disable=g-import-not-at-top,wrong-import-position
from tdm_jax.tasks.diffusers.weights import load_prompt_encoder  # pylint: disable=g-import-not-at-top,wrong-import-position

import tiny_pipeline  # pylint: disable=g-import-not-at-top,wrong-import-order,wrong-import-position
import tiny_sd3  # pylint: disable=g-import-not-at-top,wrong-import-order,wrong-import-position

PROMPTS = ["a small red circle in the top left on a white background", "two squares and one circle"]
LONG = " ".join(["a large blue square in the center on a gray background"] * 4)  # 166 CLIP tokens, 109 T5
CLIP_LENGTH = tiny_pipeline.MAX_LENGTH  # the tiny CLIP tokenizers' model_max_length (77 in the real ones)
SLOTS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"), ("tokenizer_3", "text_encoder_3"))


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("tiny_sd3"))
  return folder, tiny_sd3.make_tiny_sd3_pipeline(folder)


@pytest.fixture(scope="module")
def sd3_no_t5(tmp_path_factory):
  """The same CLIPs and transformer (same seed) without T5 (index entries [null, null]), as SD3 runs without it."""
  folder = str(tmp_path_factory.mktemp("tiny_sd3_no_t5"))
  return folder, tiny_sd3.make_tiny_sd3_pipeline(folder, with_t5=False)


def _encoders(folder) -> tuple:
  """The folder's text encoders converted by the repo's converters, built without `describe` (whose
  SD3Transformer2DModel backbone is another module's business)."""
  out = []
  for tok, enc in SLOTS:
    if not os.path.isdir(os.path.join(folder, enc)):
      continue
    config_dict = folders.read_config(folders.component_path(folder, enc))
    kind = text_encoders.kind_for(config_dict["architectures"][0], enc)
    config = kind.config_from_dict(config_dict)
    params = kind.params_from_state_dict(folders.load_state_dict(folders.component_path(folder, enc)), config)
    out.append(prompts.TextEncoder(enc, kind, kind.load_tokenizer(folders.component_path(folder, tok)),
                                   kind.module(config), params))
  return tuple(out)


def _family(pipe, folder, max_length=None):
  with open(os.path.join(folder, folders.MODEL_INDEX)) as f:
    index = json.load(f)
  family = backbones.pipeline_family(type(pipe).__name__).for_pipeline(index, dict(pipe.transformer.config))
  return family if max_length is None else family.with_max_length(max_length)


def _close(name, ours, theirs, tol=1e-5):
  ours = np.asarray(ours, np.float64)
  theirs = np.asarray(theirs.detach().float().numpy(), np.float64)
  assert ours.shape == theirs.shape, (name, ours.shape, theirs.shape)
  err = float(np.max(np.abs(ours - theirs)))
  scale = max(1.0, float(np.max(np.abs(theirs))))
  print(f"{name}: max|ours - theirs| = {err:.3e}, max|theirs| = {float(np.max(np.abs(theirs))):.3f}")
  assert err <= tol * scale, (name, err, scale)
  return err


def _diffusers(pipe, batch, max_sequence_length=256):
  with torch.no_grad():
    return pipe.encode_prompt(prompt=batch, prompt_2=None, prompt_3=None, device="cpu",
                              do_classifier_free_guidance=True, negative_prompt=None,
                              max_sequence_length=max_sequence_length)


def _compare(tag, cond, uncond, theirs):
  embeds, neg_embeds, pooled, neg_pooled = theirs
  _close(f"{tag} prompt_embeds", cond["encoder_hidden_states"], embeds)
  _close(f"{tag} negative_prompt_embeds", uncond["encoder_hidden_states"], neg_embeds)
  _close(f"{tag} pooled_prompt_embeds", cond["pooled_projections"], pooled)
  _close(f"{tag} negative_pooled_prompt_embeds", uncond["pooled_projections"], neg_pooled)
  assert set(cond) == set(uncond) == {"encoder_hidden_states", "pooled_projections"}


def test_sd3_pipelines_are_their_own_family():
  for cls in ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline"):
    assert backbones.pipeline_family(cls) is SD3, cls
  assert backbones.pipeline_family("StableDiffusionPipeline") is SD
  assert backbones.pipeline_family("StableDiffusionXLPipeline") is SDXL
  assert backbones.pipeline_family("PixArtSigmaPipeline") is PIXART_SIGMA
  with pytest.raises(ConfigError, match="FluxPipeline"):
    backbones.pipeline_family("FluxPipeline")
  assert SD3.max_length == 256 and dict(SD3.stock_call) == {"guidance_scale": 1.0}
  shorter = SD3.with_max_length(77)
  assert dict(shorter.stock_call) == {"guidance_scale": 1.0, "max_sequence_length": 77}
  assert dict(shorter.with_max_length(300).stock_call)["max_sequence_length"] == 300
  assert dict(PIXART_SIGMA.with_max_length(200).stock_call) == dict(
      PIXART_SIGMA.stock_call, max_sequence_length=200)


def test_prompts_are_encoded_as_encode_prompt_does(sd3, caplog):
  folder, pipe = sd3
  family = _family(pipe, folder)
  assert family.joint_attention_dim == tiny_sd3.JOINT_DIM and family.max_length == 256
  encoder = prompts.PromptEncoder(family, _encoders(folder), image_size=(16, 16))
  assert [e.kind.name for e in encoder.encoders] == ["clip", "clip", "t5"]
  batch = PROMPTS + [LONG]
  with caplog.at_level(logging.WARNING):
    cond, uncond = encoder(batch)
  truncated = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
  assert any(f"{CLIP_LENGTH} tokens" in m for m in truncated), truncated  # the long prompt's CLIP tokens
  assert cond["encoder_hidden_states"].shape == (3, CLIP_LENGTH + 256, tiny_sd3.JOINT_DIM)
  assert cond["pooled_projections"].shape == (3, tiny_sd3.POOLED_DIM)
  _compare("sd3", cond, uncond, _diffusers(pipe, batch))
  # The CLIP rows are zero past the two CLIP widths (8 + 16 of 32); "" is encoded, not zeroed.
  clip_width = tiny_sd3.CLIP_L["hidden"] + tiny_sd3.CLIP_G["hidden"]
  np.testing.assert_array_equal(np.asarray(cond["encoder_hidden_states"][:, :CLIP_LENGTH, clip_width:]), 0.0)
  assert np.all(np.abs(np.asarray(cond["encoder_hidden_states"][:, :CLIP_LENGTH, :clip_width])).max(-1) > 0)
  assert np.any(np.asarray(uncond["encoder_hidden_states"][:, CLIP_LENGTH:]))
  # The training step's path: tokens on the host, `encode` jitted over the weights.
  tokens = prompts.host_tokens(family, encoder.encoders, batch)
  assert all(set(t) == {"ids"} for t in tokens)  # T5 gets no attention mask, as in Diffusers
  assert [t["ids"].shape[1] for t in tokens] == [CLIP_LENGTH, CLIP_LENGTH, 256]
  jitted = jax.jit(lambda params, tokens: prompts.encode(family, encoder.encoders, params, tokens, (16, 16)))
  again = jitted([e.params for e in encoder.encoders], tokens)
  for k in cond:
    np.testing.assert_allclose(np.asarray(again[k]), np.asarray(cond[k]), rtol=1e-5, atol=1e-6, err_msg=k)


def test_a_shorter_max_sequence_length_truncates_t5(sd3, caplog):
  folder, pipe = sd3
  family = _family(pipe, folder, max_length=12)
  assert dict(family.stock_call)["max_sequence_length"] == 12
  batch = PROMPTS + [LONG]
  with caplog.at_level(logging.WARNING):
    cond, uncond = prompts.PromptEncoder(family, _encoders(folder), image_size=(16, 16))(batch)
  assert any("text_encoder_3" in r.getMessage() and "12 tokens" in r.getMessage() for r in caplog.records)
  assert cond["encoder_hidden_states"].shape == (3, CLIP_LENGTH + 12, tiny_sd3.JOINT_DIM)
  _compare("sd3 max_sequence_length=12", cond, uncond, _diffusers(pipe, batch, max_sequence_length=12))


def test_without_t5_its_states_are_zeros(sd3_no_t5):
  folder, pipe = sd3_no_t5
  with open(os.path.join(folder, folders.MODEL_INDEX)) as f:
    assert json.load(f)["text_encoder_3"] == [None, None]
  family = _family(pipe, folder)
  assert dict(family.stock_load) == {"text_encoder_3": None, "tokenizer_3": None}
  encoder = prompts.PromptEncoder(family, _encoders(folder), image_size=(16, 16))
  assert len(encoder.encoders) == 2
  batch = PROMPTS + [LONG]
  cond, uncond = encoder(batch)
  assert cond["encoder_hidden_states"].shape == (3, CLIP_LENGTH + 256, tiny_sd3.JOINT_DIM)
  np.testing.assert_array_equal(np.asarray(cond["encoder_hidden_states"][:, CLIP_LENGTH:]), 0.0)
  _compare("sd3 without T5", cond, uncond, _diffusers(pipe, batch))
  # Without the transformer's width the zeros cannot be made: said in one line.
  bare = prompts.PromptEncoder(SD3, encoder.encoders, image_size=(16, 16))
  with pytest.raises(ConfigError, match="joint_attention_dim"):
    bare(PROMPTS)


def _edit_json(path, **entries):
  with open(path) as f:
    content = json.load(f)
  content.update(entries)
  with open(path, "w") as f:
    json.dump(content, f)


def test_describe_reads_sd3_folders(sd3, sd3_no_t5, tmp_path):
  for (folder, pipe), encoders in ((sd3, 3), (sd3_no_t5, 2)):
    d = describe(folder)
    assert d.family.name == "sd3" and d.family.joint_attention_dim == tiny_sd3.JOINT_DIM
    assert [s.encoder for s in d.encoders] == ["text_encoder", "text_encoder_2", "text_encoder_3"][:encoders]
    assert not d.force_zeros_for_empty_prompt and d.denoiser == "transformer"
    # The family's stock load reads the folder as it is (without T5: text_encoder_3=None, tokenizer_3=None).
    loaded = diffusers.DiffusionPipeline.from_pretrained(folder, **dict(d.family.stock_load))
    assert (loaded.text_encoder_3 is None) == (encoders == 2)
    cond, uncond = load_prompt_encoder(folder)(PROMPTS)
    _compare(f"describe, {encoders} encoders", cond, uncond, _diffusers(pipe, PROMPTS))
  # No index entry at all for T5 reads as [null, null].
  missing = str(tmp_path / "no_entry")
  shutil.copytree(sd3_no_t5[0], missing)
  with open(os.path.join(missing, folders.MODEL_INDEX)) as f:
    index = json.load(f)
  del index["text_encoder_3"], index["tokenizer_3"]
  with open(os.path.join(missing, folders.MODEL_INDEX), "w") as f:
    json.dump(index, f)
  assert dict(describe(missing).family.stock_load) == {"text_encoder_3": None, "tokenizer_3": None}
  # A CLIP without projection gives no pooled embedding: refused in one line naming the component.
  plain = str(tmp_path / "plain_clip")
  shutil.copytree(sd3[0], plain)
  _edit_json(os.path.join(plain, folders.MODEL_INDEX), text_encoder_2=["transformers", "CLIPTextModel"])
  _edit_json(os.path.join(plain, "text_encoder_2", "config.json"), architectures=["CLIPTextModel"])
  with pytest.raises(folders.FolderError, match=r"text_encoder_2 to be a CLIPTextModelWithProjection") as err:
    describe(plain)
  assert "\n" not in str(err.value)
  _edit_json(os.path.join(plain, folders.MODEL_INDEX), text_encoder_2=[None, None])
  with pytest.raises(folders.FolderError, match=r"text_encoder_2 to be a CLIPTextModelWithProjection"):
    describe(plain)
