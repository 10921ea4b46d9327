"""The embedded CogVideoX-style video teacher's pretraining (configs/shapes_cogvideox_teacher.py): every stage,
tiny and short, makes a CogVideoXPipeline folder that stock Diffusers loads and samples as our sampler does."""

import functools
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO  # noqa: F401 (puts the repo on sys.path)
from test_shapes_teacher import _tiny_transformer_teacher
from tdm_jax.convert import folders
from tdm_jax.core import sample
from tdm_jax.core.schedules import from_diffusers_config
from tdm_jax.tasks.diffusers import weights
from tdm_jax.tasks.diffusers.description import describe
from tdm_jax.tasks.shapes import cogvideox_teacher, pixart_teacher, video_data

PROMPTS = ["a small red circle in the top left moving right on a white background",
           "a video of a large blue square standing still in the center with a black background"]


def test_lecun_init_is_the_layers_initialisation():
  """One flat draw, shaped as the tree: kernels LeCun-normal over their fan-in, biases 0, norm scales 1."""
  abstract = {"conv": {"kernel": jax.ShapeDtypeStruct((3, 3, 3, 16, 32), jnp.float32),
                       "bias": jax.ShapeDtypeStruct((32,), jnp.float32)},
              "norm": {"scale": jax.ShapeDtypeStruct((16,), jnp.float32)},
              "dense": {"kernel": jax.ShapeDtypeStruct((64, 8), jnp.float32)}}
  params = cogvideox_teacher.lecun_init(abstract, jax.random.PRNGKey(0))
  assert jax.tree.map(lambda a: a.shape, params) == jax.tree.map(lambda a: a.shape, abstract)
  np.testing.assert_allclose(np.std(params["conv"]["kernel"]), 1 / np.sqrt(3 * 3 * 3 * 16), rtol=0.05)
  np.testing.assert_allclose(np.std(params["dense"]["kernel"]), 1 / np.sqrt(64), rtol=0.15)
  assert np.abs(params["conv"]["kernel"]).max() <= 2 / 0.87962566103423978 / np.sqrt(3 * 3 * 3 * 16) + 1e-6
  assert not np.any(params["conv"]["bias"]) and np.all(params["norm"]["scale"] == 1)
  with pytest.raises(ValueError, match="embedding"):
    cogvideox_teacher.lecun_init({"embedding": jax.ShapeDtypeStruct((4, 4), jnp.float32)}, jax.random.PRNGKey(0))


def test_pool_shards_of_another_vae_or_size_are_not_reused(tmp_path):
  path = str(tmp_path / "00000000.npz")
  assert cogvideox_teacher._load_shard(path, 2, "a") is None  # pylint: disable=protected-access
  np.savez(path, vae=np.array("a"), mean=np.zeros((2, 4, 3, 8, 8)), logvar=np.zeros((2, 4, 3, 8, 8)),
           captions=np.array(["one", "two"]))
  shard = cogvideox_teacher._load_shard(path, 2, "a")  # pylint: disable=protected-access
  assert shard["mean"].shape == (2, 4, 3, 8, 8) and list(shard["captions"]) == ["one", "two"]
  assert cogvideox_teacher._load_shard(path, 2, "b") is None  # pylint: disable=protected-access
  assert cogvideox_teacher._load_shard(path, 3, "a") is None  # pylint: disable=protected-access


def test_pool_order_is_a_permutation_per_epoch():
  config = types.SimpleNamespace(seed=0)
  order = [cogvideox_teacher.pool_indices(config, step, 4, 6) for step in range(3)]
  seen = np.concatenate(order)
  assert sorted(seen[:6]) == list(range(6)) and sorted(seen[6:12]) == list(range(6))
  np.testing.assert_array_equal(order[1], cogvideox_teacher.pool_indices(config, 1, 4, 6))


def _stock_latents_equal_ours(out, length):
  """The stock pipeline's latents from 2 DDIM steps with CFG equal our sampler's on the converted teacher."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  pipe = diffusers.CogVideoXPipeline.from_pretrained(out)
  pipe.set_progress_bar_config(disable=True)
  d = describe(out)
  trees = weights.convert_pipeline(out)
  cond, uncond = weights.load_prompt_encoder(out)(PROMPTS)
  assert cond["encoder_hidden_states"].shape == (2, length, 64)
  model = d.backbone.module(d.denoiser_config, dtype=jnp.float32, attention_implementation="xla", remat=False)
  schedule = from_diffusers_config(d.scheduler_config, image_seq_len=d.geometry().tokens)
  z = np.random.default_rng(0).standard_normal((2,) + d.geometry().latent_shape).astype(np.float32)
  ours = jax.jit(functools.partial(sample.teacher_sample, d.backbone.apply_fn(model), num_steps=2, guidance_scale=6.0,
                                   spacing="trailing"))(trees["transformer"], schedule, z, cond, uncond)
  with torch.no_grad():
    stock = pipe(PROMPTS, num_inference_steps=2, guidance_scale=6.0, latents=torch.from_numpy(z),
                 max_sequence_length=length, height=32, width=32, num_frames=9, output_type="latent").frames
  assert np.abs(stock.numpy() - z).max() > 0.1  # the 2 steps moved the latents
  np.testing.assert_allclose(np.asarray(ours), stock.numpy(), rtol=0, atol=1e-4)


def test_cogvideox_pretrain_mode_makes_a_cogvideox_folder(tmp_path):
  """Every stage (base, VAE, transformer, pipeline), tiny and short, through the CLI entry; then the same
  command again resumes and trains nothing."""
  from configs import shapes_cogvideox_teacher as teacher_config  # pylint: disable=g-import-not-at-top
  config = teacher_config.get_config()
  config.vae.block_out_channels = (8, 16, 16)
  config.vae.norm_num_groups = 4
  config.vae.latent_channels = 4
  config.vae.num_iterations = 2
  config.vae.batch_size = 2
  config.vae.scaling_clips = 4
  config.transformer.time_embed_dim = 16
  config.transformer.latent_pool = 3  # two encoded batches of 2, the last cut to 1
  config.prompts.num_train, config.prompts.num_eval = 4, 3
  length = config.text.max_sequence_length
  workdir = str(tmp_path / "cogvideox_teacher")
  vae_weights = os.path.join(workdir, "base", "vae", "diffusion_pytorch_model.safetensors")
  first = {}

  def check(out):
    index = folders.read_model_index(out)
    assert index["_class_name"] == "CogVideoXPipeline"
    assert {k: v for k, v in index.items() if not k.startswith("_")} == {
        "scheduler": ["diffusers", "CogVideoXDDIMScheduler"], "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5Tokenizer"], "transformer": ["diffusers", "CogVideoXTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLCogVideoX"]}
    d = describe(out)
    assert d.family.name == "cogvideox" and d.backbone.name == "cogvideox" and d.family.max_length == length
    assert d.vae.class_name == "AutoencoderKLCogVideoX"
    g = d.geometry()
    assert (g.frames, g.height, g.width) == (9, 32, 32) and g.latent_shape == (5, 4, 8, 8)  # time 2x, space 4x
    transformer = d.denoiser_config_dict
    assert (transformer["num_layers"], transformer["max_text_seq_length"], transformer["text_embed_dim"]) == (1, length, 64)
    assert not transformer["use_rotary_positional_embeddings"]
    scheduler = d.scheduler_config
    assert (scheduler["prediction_type"], scheduler["snr_shift_scale"], scheduler["timestep_spacing"]) == (
        "v_prediction", 1.0, "trailing")
    scaling = d.vae_config_dict["scaling_factor"]
    assert 0 < scaling and scaling != 1.0  # measured on the trained latents
    t5 = folders.load_state_dict(folders.component_path(out, "text_encoder"))
    shipped = folders.load_state_dict(folders.component_path(pixart_teacher.SHIPPED_PIPELINE, "text_encoder"))
    for name, value in shipped.items():  # frozen: the shipped encoder's weights, unchanged
      np.testing.assert_array_equal(t5[name], value, err_msg=name)
    _stock_latents_equal_ours(out, length)
    first["vae_metrics"] = open(os.path.join(workdir, "vae", "metrics.jsonl")).read()
    first["vae_mtime"] = os.path.getmtime(vae_weights)

  _tiny_transformer_teacher(config, workdir, check)  # runs, checks, runs again: the denoiser is not retrained
  with np.load(os.path.join(workdir, "denoiser", "latent_pool", "00000000.npz")) as pool:
    assert pool["mean"].shape == pool["logvar"].shape == (3, 4, 5, 8, 8) and len(pool["captions"]) == 3
  assert open(os.path.join(workdir, "vae", "metrics.jsonl")).read() == first["vae_metrics"]
  assert os.path.getmtime(vae_weights) == first["vae_mtime"]  # the VAE stage is not run again either
  for name, n, split in (("prompts_train.txt", 4, "train"), ("prompts_eval.txt", 3, "eval")):
    captions = open(os.path.join(workdir, name)).read().splitlines()
    assert len(captions) == n and all(video_data.split_of(video_data.parse_caption(c)) == split for c in captions)
