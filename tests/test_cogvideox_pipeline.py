"""A CogVideoX pipeline folder through the family seam: described, its prompts encoded as
`CogVideoXPipeline.encode_prompt` encodes them (T5, 226 tokens, no mask), its teacher sampled by our DDIM
as the stock pipeline samples it, and the folders tdm_jax does not distil refused up front."""

import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

import tiny_cogvideox_pipeline
from tdm_jax.convert import folders
from tdm_jax.core import sample
from tdm_jax.infra.errors import ConfigError
from tdm_jax.tasks.diffusers import build, prompts, weights
from tdm_jax.tasks.diffusers.backbones import cogvideox as cogvideox_family
from tdm_jax.tasks.diffusers.description import describe
from tdm_jax.core.schedules import from_diffusers_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a small red circle moving right on a white background", "a photo of a cat"]
TOL = 1e-5


@pytest.fixture(scope="module", params=["2b", "5b"])
def tiny(request, tmp_path_factory):
  folder = str(tmp_path_factory.mktemp(f"cogvideox_{request.param}"))
  return folder, tiny_cogvideox_pipeline.make_tiny_cogvideox_pipeline(folder, variant=request.param)


def test_describe_and_geometry(tiny):
  folder, _ = tiny
  d = describe(folder)
  assert d.family.name == "cogvideox" and d.backbone is cogvideox_family.BACKBONE
  # The prompt length is the transformer's (226 in the real models), and the stock call passes it.
  assert d.family.max_length == tiny_cogvideox_pipeline.TEXT_TOKENS and not d.family.uses_mask
  assert dict(d.family.stock_call) == {"guidance_scale": 1.0, "use_dynamic_cfg": False,
                                       "max_sequence_length": tiny_cogvideox_pipeline.TEXT_TOKENS}
  assert d.vae.class_name == "AutoencoderKLCogVideoX" and d.vae.video
  g = d.geometry()
  assert (g.frames, g.height, g.width) == (tiny_cogvideox_pipeline.FRAMES, tiny_cogvideox_pipeline.HEIGHT,
                                           tiny_cogvideox_pipeline.WIDTH)
  assert g.latent_shape == (3, 4, 4, 6) and g.tokens == 3 * 2 * 3


@pytest.mark.parametrize("length", [226, None], ids=["226 tokens", "the transformer's length"])
def test_prompts_equal_encode_prompt(tiny, length):
  """T5 tokens padded to the length (the real models' 226; by default the transformer's max_text_seq_length),
  padding attended (no mask), the negative branch the encoded empty prompt."""
  folder, pipe = tiny
  d = describe(folder)
  encoder = prompts.PromptEncoder.from_description(d, weights.convert_pipeline(folder), max_length=length)
  cond, uncond = encoder(PROMPTS)
  tokens = length or tiny_cogvideox_pipeline.TEXT_TOKENS
  with torch.no_grad():
    ours_cond, ours_uncond = pipe.encode_prompt(PROMPTS, negative_prompt="", do_classifier_free_guidance=True,
                                                max_sequence_length=tokens)
  assert set(cond) == {"encoder_hidden_states"} and cond["encoder_hidden_states"].shape == (2, tokens, 32)
  np.testing.assert_allclose(np.asarray(cond["encoder_hidden_states"]), ours_cond.numpy(), rtol=0, atol=TOL)
  np.testing.assert_allclose(np.asarray(uncond["encoder_hidden_states"]), ours_uncond.numpy(), rtol=0, atol=TOL)


def test_text_length_the_transformer_cannot_take_is_refused(tiny):
  """2B-style transformers add a position table sized for exactly max_text_seq_length text tokens."""
  folder, _ = tiny
  d = describe(folder)
  config = ml_collections.ConfigDict({"model": {"max_sequence_length": 20}})
  if d.denoiser_config.use_rotary_positional_embeddings:  # 5B-style: any length
    assert build.run_family(config, d).max_length == 20
  else:
    with pytest.raises(ConfigError, match="model.max_sequence_length=20: .* exactly max_text_seq_length=12"):
      build.run_family(config, d)


def test_teacher_sampling_equals_the_stock_pipeline(tiny):
  """Our DDIM with classifier-free guidance on the converted teacher makes the latents the stock
  CogVideoXPipeline makes from the same noise (4 steps, CFG 6, its default)."""
  folder, pipe = tiny
  d = describe(folder)
  trees = weights.convert_pipeline(folder)
  encoder = weights.load_prompt_encoder(folder)
  cond, uncond = encoder(PROMPTS)
  model = d.backbone.module(d.denoiser_config, dtype=jnp.float32, attention_implementation="xla", remat=False)
  schedule = from_diffusers_config(d.scheduler_config, image_seq_len=d.geometry().tokens)
  z = np.random.default_rng(0).standard_normal((2,) + d.geometry().latent_shape).astype(np.float32)
  ours = jax.jit(functools.partial(sample.teacher_sample, d.backbone.apply_fn(model), num_steps=4, guidance_scale=6.0,
                                   spacing="trailing"))(trees["transformer"], schedule, z, cond, uncond)
  with torch.no_grad():
    stock = pipe(PROMPTS, num_inference_steps=4, guidance_scale=6.0, latents=torch.from_numpy(z),
                 max_sequence_length=tiny_cogvideox_pipeline.TEXT_TOKENS,
                 height=tiny_cogvideox_pipeline.HEIGHT, width=tiny_cogvideox_pipeline.WIDTH,
                 num_frames=tiny_cogvideox_pipeline.FRAMES, output_type="latent").frames
  np.testing.assert_allclose(np.asarray(ours), stock.numpy(), rtol=0, atol=1e-4)
  # The VAE kind decodes as the pipeline does (divided by the scaling factor, frames first).
  video = jax.jit(d.decoder())(trees["vae"], jnp.asarray(ours))
  with torch.no_grad():
    theirs = pipe.decode_latents(stock).numpy()  # (B, C, F, H, W)
  assert video.shape == (2, tiny_cogvideox_pipeline.FRAMES, 3, 16, 24)
  np.testing.assert_allclose(np.swapaxes(np.asarray(video), 1, 2), theirs, rtol=0, atol=1e-3)


def _edit_json(path, **entries):
  with open(path) as f:
    content = json.load(f)
  content.update(entries)
  with open(path, "w") as f:
    json.dump(content, f)


def test_folders_not_distilled_are_refused(tiny, tmp_path):
  folder, _ = tiny
  i2v = str(tmp_path / "i2v")
  shutil.copytree(folder, i2v)
  _edit_json(os.path.join(i2v, folders.MODEL_INDEX), _class_name="CogVideoXImageToVideoPipeline")
  with pytest.raises(ConfigError, match="'CogVideoXImageToVideoPipeline'"):
    describe(i2v)
  v15 = str(tmp_path / "v15")
  shutil.copytree(folder, v15)
  _edit_json(os.path.join(v15, "transformer", "config.json"), patch_size_t=2)
  with pytest.raises(ConfigError, match="patch_size_t"):
    describe(v15)


def test_attention_that_would_not_fit_is_refused_before_compiling(tmp_path):
  """At CogVideoX-2B's size (the published configs, shape-only), "xla" attention would hold a 70 GiB score
  matrix per device (batch 1, doubled by the guided pass): refused in one line naming model.attention."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("cogvideox_2b", os.path.join(REPO, "configs", "cogvideox_2b.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.model.reference = os.path.join(REPO, "configs", "diffusers", "cogvideox-2b")
  config.model.attention = "xla"
  config.mesh.shape = (1, 1, 1)
  config.train.batch_size = 1
  with pytest.raises(ConfigError, match=r"model.attention='xla' would hold the full attention score matrix: "
                                        r"17,776 x 17,776 tokens x 30 heads x batch 2"):
    build.build_task(config, str(tmp_path), devices=jax.devices()[:1], materialize=False)
