"""The shipped flow-matching teacher: a small SD3-style pipeline on the shapes data, trained with rectified flow.

`python -m tdm_jax.main --config=configs/shapes_sd3_teacher.py --workdir=DIR --mode=pretrain` runs
the stages below in order; each resumes from its own checkpoints:

  1. `base/`: every component but the transformer's weights, in the real `StableDiffusion3Pipeline`
     layout. The text encoders are the shipped teachers' own, already trained on these captions and
     kept frozen: CLIP-L-like `text_encoder` (the SDXL-style teacher's first encoder, given an identity
     `text_projection` so that it is the CLIPTextModelWithProjection SD3 needs), CLIP-G-like
     `text_encoder_2` (its second, with its projection), and the PixArt-style teacher's T5 as
     `text_encoder_3` with its sentencepiece tokenizer. The VAE is the SDXL-style teacher's, with the
     `shift_factor` SD3 pipelines read (0: its latents are already centred by its scaling factor).
  2. `denoiser/`: the SD3Transformer2DModel (MMDiT), trained alone with the rectified-flow objective
     (velocity at logit-normal sigma on the shifted grid, as SD3 was trained); captions are dropped to
     the encoding of "" (what SD3 pipelines feed the unconditional branch). The EMA ships.
  3. `pipeline/`: the Diffusers folder with FlowMatchEulerDiscreteScheduler (shift `schedule.shift`).

Prompts go through SD3's own encoding (`backbones.mmdit.SD3`): the CLIP pair's penultimate states joined to
T5's tokens. The T5 states are `text.max_sequence_length` tokens (not SD3's 256: the captions are
short, and SD3 feeds T5's padding to the transformer unmasked, so the length the teacher is trained
at is the length every call must use; exports and the evaluation pass it as `max_sequence_length`).
The CLIP pair's 128 features are wider than T5's 64, so SD3's encoding keeps the first 64 of them
(CLIP-L's), exactly as Diffusers pads (here crops) them; both CLIPs' pooled projections are kept.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from tdm_jax.convert import folders
from tdm_jax.convert.pipeline import export_pipeline
from tdm_jax.core import pretrain
from tdm_jax.core.schedules import FlowSchedule
from tdm_jax.infra.errors import ConfigError
from tdm_jax.models.mmdit import MMDiTConfig, SD3Transformer2DModel
from tdm_jax.models.vae import AutoencoderKL, VAEConfig
from tdm_jax.tasks.diffusers import prompts as pipeline_prompts
from tdm_jax.tasks.diffusers.description import describe
from tdm_jax.tasks.shapes import data as shapes_data
from tdm_jax.tasks.shapes import teacher as sdxl_teacher

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tdm_jax/
SHIPPED_PIPELINE = os.path.join(PACKAGE_DIR, "assets", "shapes_sd3", "pipeline")
DIFFUSERS_VERSION = sdxl_teacher.DIFFUSERS_VERSION
ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")

MODEL_INDEX = {
    "_class_name": "StableDiffusion3Pipeline", "_diffusers_version": DIFFUSERS_VERSION,
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "text_encoder_3": ["transformers", "T5EncoderModel"], "tokenizer_3": ["transformers", "T5Tokenizer"],
    "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
    "image_encoder": [None, None], "feature_extractor": [None, None]}


def scheduler_config(config) -> dict:
  return dict(_class_name="FlowMatchEulerDiscreteScheduler", _diffusers_version=DIFFUSERS_VERSION,
              num_train_timesteps=1000, shift=float(config.schedule.shift), use_dynamic_shifting=False,
              base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096, invert_sigmas=False,
              shift_terminal=None, use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
              time_shift_type="exponential", stochastic_sampling=False)


def transformer_config(config, vae_config: dict, joint_dim: int, pooled_dim: int) -> dict:
  m = config.transformer
  factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
  width = m.num_attention_heads * m.attention_head_dim
  return dict(_class_name="SD3Transformer2DModel", _diffusers_version=DIFFUSERS_VERSION,
              sample_size=config.shapes.image_size // factor, patch_size=m.patch_size,
              in_channels=vae_config["latent_channels"], out_channels=vae_config["latent_channels"],
              num_layers=m.num_layers, attention_head_dim=m.attention_head_dim,
              num_attention_heads=m.num_attention_heads, joint_attention_dim=joint_dim, caption_projection_dim=width,
              pooled_projection_dim=pooled_dim, pos_embed_max_size=m.pos_embed_max_size,
              dual_attention_layers=list(m.dual_attention_layers), qk_norm=m.qk_norm or None)


# ---- stage 1: the frozen components ----------------------------------------------------------------


def _with_identity_projection(folder: str, out: str) -> None:
  """The SDXL-style teacher's first CLIP encoder as a CLIPTextModelWithProjection: the same weights plus an
  identity `text_projection`, so its pooled projection is its pooled output."""
  state = folders.load_state_dict(folder)
  config = folders.read_config(folder)
  width = int(config["hidden_size"])
  state = dict(state, **{"text_projection.weight": np.eye(width, dtype=np.float32)})
  config = dict(config, architectures=["CLIPTextModelWithProjection"], projection_dim=width)
  folders.save_state_dict(out, state, config, weights_name="model.safetensors")


def write_base(config, out: str) -> str:
  """Stage 1: `out` holds the pipeline but for the transformer's weights (its config.json is there)."""
  sdxl, pixart = config.clip_from, config.t5_from
  parent = os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=".base-", dir=parent)
  try:
    folders.write_json(os.path.join(staging, folders.MODEL_INDEX), MODEL_INDEX)
    folders.write_json(os.path.join(staging, "scheduler", "scheduler_config.json"), scheduler_config(config))
    _with_identity_projection(os.path.join(sdxl, "text_encoder"), os.path.join(staging, "text_encoder"))
    shutil.copytree(os.path.join(sdxl, "text_encoder_2"), os.path.join(staging, "text_encoder_2"))
    shutil.copytree(os.path.join(sdxl, "tokenizer"), os.path.join(staging, "tokenizer"))
    shutil.copytree(os.path.join(sdxl, "tokenizer_2"), os.path.join(staging, "tokenizer_2"))
    shutil.copytree(os.path.join(pixart, "text_encoder"), os.path.join(staging, "text_encoder_3"))
    shutil.copytree(os.path.join(pixart, "tokenizer"), os.path.join(staging, "tokenizer_3"))
    shutil.copytree(os.path.join(sdxl, "vae"), os.path.join(staging, "vae"))
    vae_config = dict(folders.read_config(os.path.join(staging, "vae")), shift_factor=0.0)
    folders.write_json(os.path.join(staging, "vae", "config.json"), vae_config)
    t5 = folders.read_config(os.path.join(staging, "text_encoder_3"))
    pooled = sum(int(folders.read_config(os.path.join(staging, n))["projection_dim"]) for n in ENCODERS[:2])
    folders.write_json(os.path.join(staging, "transformer", "config.json"),
                       transformer_config(config, vae_config, int(t5["d_model"]), pooled))
    if os.path.isdir(out):
      shutil.rmtree(out)
    os.rename(staging, out)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return out


# ---- stage 2: the transformer ----------------------------------------------------------------------


class Denoiser:
  """The MMDiT as a pure function of its tree, conditioned through SD3's own prompt encoding on frozen encoders."""

  def __init__(self, config, base: str):
    self.config = config
    d = describe(base)
    self.family = d.family.with_max_length(int(config.text.max_sequence_length))
    trees = {s.encoder: d.params_from_state_dict(s.encoder, folders.load_state_dict(
        folders.component_path(base, s.encoder))) for s in d.encoders}
    self.encoders = pipeline_prompts.encoder_modules(d, "float32", trees=jax.tree.map(jnp.asarray, trees))
    self.transformer_dict = d.denoiser_config_dict
    self.transformer = SD3Transformer2DModel(MMDiTConfig.from_dict(self.transformer_dict),
                                             attention_implementation="auto")
    self.vae_config = d.vae_config_dict
    self.vae = AutoencoderKL(VAEConfig.from_dict(self.vae_config))
    self.schedule = FlowSchedule.from_diffusers_config(d.scheduler_config)
    self.image_size = (config.shapes.image_size,) * 2
    self.null_tokens = self.tokens([""])

  def tokens(self, captions) -> list:
    return pipeline_prompts.host_tokens(self.family, self.encoders, captions)

  def condition(self, tokens) -> dict:
    return pipeline_prompts.encode(self.family, self.encoders, [e.params for e in self.encoders], tokens,
                                   self.image_size)

  def init(self, key):
    cond = self.condition(self.null_tokens)
    side = self.transformer_dict["sample_size"]
    latents = jnp.zeros((1, self.transformer_dict["in_channels"], side, side))
    params = self.transformer.init(key, latents, jnp.zeros((1,)), cond["encoder_hidden_states"],
                                   cond["pooled_projections"])["params"]
    return nn.meta.unbox(params)  # plain arrays: checkpoints restore without the model

  def velocity(self, params, x_t, t, cond):
    return self.transformer.apply({"params": params}, x_t, t, cond["encoder_hidden_states"], cond["pooled_projections"])

  def loss(self, params, vae_params, x, tokens, key):
    """The velocity objective on posterior-sampled latents (the VAE's scaling and SD3's shift applied);
    captions dropped to the encoding of ""."""
    z_key, loss_key = jax.random.split(key)
    latents = jax.lax.stop_gradient(self.vae.latents_from_images(vae_params, x, z_key))
    cond = jax.lax.stop_gradient(self.condition(tokens))
    null = jax.lax.stop_gradient(self.condition(self.null_tokens))
    uncond = jax.tree.map(lambda n, c: jnp.broadcast_to(n, c.shape), null, cond)
    return pretrain.denoising_loss(params, self.velocity, self.schedule, latents, cond, uncond, loss_key,
                                   self.config.transformer.cond_dropout,
                                   min_snr_gamma=self.config.transformer.min_snr_gamma)


def captioned_batch(config, denoiser: Denoiser, step: int, batch_size: int):
  """Iteration `step`'s images (NCHW in [-1, 1]) and their tokens for each encoder (the SDXL-style
  teacher's data stream)."""
  pixels, captions, _ = sdxl_teacher.examples(config, sdxl_teacher.DENOISER_STREAM, step * batch_size, batch_size)
  tokens = denoiser.tokens(captions)
  t5 = tokens[-1]["ids"]
  if (t5[:, -1] != 0).any():
    raise ConfigError(f"a caption of iteration {step} fills text.max_sequence_length="
                      f"{config.text.max_sequence_length} T5 tokens; raise it")
  return shapes_data.images_to_float(pixels), tokens


def train_denoiser(config, workdir: str, denoiser: Denoiser, vae_params, progress: bool = True):
  """Trains (or resumes) the transformer in `workdir/denoiser`; returns the EMA tree."""
  return sdxl_teacher.fit_denoiser(
      config, config.transformer, workdir, denoiser.init,
      lambda params, batch, key: denoiser.loss(params, vae_params, *batch, key),
      lambda step: captioned_batch(config, denoiser, step, config.transformer.batch_size), progress)


# ---- stage 3: the Diffusers folder ------------------------------------------------------------------


def write_pipeline(base: str, out: str, transformer_params) -> str:
  """The whole StableDiffusion3Pipeline folder at `out`: `base` plus the transformer's weights."""
  d = describe(base)
  trees = {"transformer": transformer_params}
  for name in d.model_components:
    if name != "transformer":
      trees[name] = d.params_from_state_dict(name, folders.load_state_dict(folders.component_path(base, name)))
  return export_pipeline(base, trees, out, d.write_component, components=d.model_components)


def pretrain_pipeline(config, workdir: str) -> str:
  """Runs every stage (resuming where a previous run stopped); returns the pipeline folder."""
  base = os.path.join(workdir, "base")
  if not os.path.isfile(os.path.join(base, folders.MODEL_INDEX)):
    write_base(config, base)
  denoiser = Denoiser(config, base)
  vae_params = describe(base).params_from_state_dict("vae", folders.load_state_dict(os.path.join(base, "vae")))
  logging.info("SD3 transformer %s", json.dumps(denoiser.transformer_dict))
  params = train_denoiser(config, workdir, denoiser, vae_params, config.train.progress)
  return write_pipeline(base, os.path.join(workdir, "pipeline"), params)
