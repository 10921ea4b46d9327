"""The shipped teacher, made from nothing: a small SDXL-style pipeline trained on the shapes data.

`python -m tdm_jax.main --config=configs/shapes_teacher.py --workdir=DIR --mode=pretrain` runs
the stages below in order; each resumes from its own checkpoints, and a finished stage is not
run again:

  1. `vae/`: an AutoencoderKL (reconstruction L1 + a light KL), then the latent scaling factor
     as 1 / std of the latents, as Stable Diffusion's was chosen.
  2. `denoiser/`: the text_time UNet and both CLIP text encoders, trained together with the
     usual epsilon objective on VAE latents; captions are dropped (embeddings zeroed, as SDXL's
     `force_zeros_for_empty_prompt` feeds the unconditional branch) for classifier-free guidance.
     An EMA of the weights is what ships.
  3. `pipeline/`: the Diffusers SDXL folder (model_index.json, unet/, vae/, text_encoder*/,
     tokenizer*/ with the caption vocabulary, scheduler/), written by our own exporters.
  4. `evaluator/`: the attribute classifier `tdm_jax.tasks.shapes.evaluator` scores samples with.
  5. `prompts_train.txt`, `prompts_eval.txt`: captions to distil on and to evaluate with, from
     data streams of their own.

The repository ships the results under `tdm_jax/assets/shapes/`.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from tdm_jax import default_config
from tdm_jax.convert import folders
from tdm_jax.convert.pipeline import export_pipeline
from tdm_jax.core import pretrain, rng
from tdm_jax.core.schedules import make_schedule
from tdm_jax.infra import data
from tdm_jax.infra.files import atomic_write_bytes
from tdm_jax.models.clip import ClipConfig, CLIPTextEncoder
from tdm_jax.models.unet import UNet2DConditionModel, UNetConfig
from tdm_jax.models.vae import AutoencoderKL, VAEConfig
from tdm_jax.tasks.diffusers.backbones.unet import sdxl_condition, sdxl_time_ids
from tdm_jax.tasks.diffusers.description import describe
from tdm_jax.tasks.shapes import data as shapes_data
from tdm_jax.tasks.shapes import evaluator

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tdm_jax/
ASSETS = os.path.join(PACKAGE_DIR, "assets", "shapes")
SHIPPED_PIPELINE = os.path.join(ASSETS, "pipeline")
SHIPPED_EVALUATOR = os.path.join(ASSETS, "evaluator")
SHIPPED_TRAIN_PROMPTS = os.path.join(ASSETS, "prompts_train.txt")
SHIPPED_EVAL_PROMPTS = os.path.join(ASSETS, "prompts_eval.txt")


def distillation_config(pipeline: str):
  """What every shapes main command shares (configs/shapes*.py set their rates, length and the rest):
  float32 full-copy student and fake score distilled from the shipped `pipeline` on the shipped training
  captions, CFG 4, one unified student for 1, 2 and 4 steps, batch 32, checkpoints every 100 iterations,
  scored on the shapes benchmark."""
  config = default_config.diffusers_config(dtype="float32", teacher_dtype="float32", remat=False)
  config.teacher.pipeline = pipeline
  config.data.prompt_source = SHIPPED_TRAIN_PROMPTS
  config.tdm.guidance_scale = 4.0
  config.tdm.step_choices = (1, 2, 4)
  config.train.batch_size = 32
  config.train.checkpoint_every = 100
  use_shapes_benchmark(config.eval)
  return config


def use_shapes_benchmark(eval_config) -> None:
  """Sets `config.eval` to the shapes benchmark every shapes main command is scored on: the shipped
  evaluator, the 128 held-out captions x 4 noises, the teacher at 50, 25 and 4 steps, the student at
  1, 2 and 4. One place, so that the SDXL-style and transformer teachers' tables stay comparable."""
  eval_config.prompt_file = SHIPPED_EVAL_PROMPTS
  eval_config.classifier = SHIPPED_EVALUATOR
  eval_config.num_samples = 128
  eval_config.samples_per_prompt = 4
  eval_config.teacher_steps = (50, 25, 4)
  eval_config.student_steps = (1, 2, 4)


# Data streams (seed * 1000 + stream): each use of the procedural data draws from its own.
VAE_STREAM, DENOISER_STREAM, SCALING_STREAM, TRAIN_PROMPT_STREAM, EVAL_PROMPT_STREAM = range(5)
DIFFUSERS_VERSION = "0.42.1"  # the version the folder layout was checked against (tests load it)
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


# ---- component configs, in the Diffusers / Transformers config.json form -----------------------


def shapes_config(config) -> shapes_data.ShapesConfig:
  return shapes_data.ShapesConfig(image_size=config.shapes.image_size)


def make_tokenizer(config):
  """A CLIP tokenizer with one token per caption word (both of the pipeline's tokenizers)."""
  return data.word_tokenizer(shapes_data.vocabulary(), config.text.max_length)


def text_encoder_configs(config, tokenizer) -> tuple:
  """(text_encoder, text_encoder_2) config.json dicts: ViT-L-like (quick_gelu) and bigG-like
  (gelu, with the projection that gives SDXL's pooled embedding)."""
  t, vocab = config.text, tokenizer.get_vocab()
  common = dict(model_type="clip_text_model", vocab_size=len(vocab), hidden_size=t.hidden_size,
                intermediate_size=t.intermediate_size, num_hidden_layers=t.num_hidden_layers,
                num_attention_heads=t.num_attention_heads, max_position_embeddings=t.max_length,
                projection_dim=t.projection_dim, layer_norm_eps=1e-5, attention_dropout=0.0, dropout=0.0,
                initializer_range=0.02, initializer_factor=1.0, bos_token_id=vocab[BOS], eos_token_id=vocab[EOS],
                pad_token_id=vocab[EOS], torch_dtype="float32")
  return (dict(common, architectures=["CLIPTextModel"], hidden_act="quick_gelu"),
          dict(common, architectures=["CLIPTextModelWithProjection"], hidden_act="gelu"))


def vae_config(config, scaling_factor: float = 1.0) -> dict:
  v = config.vae
  n = len(v.block_out_channels)
  return dict(_class_name="AutoencoderKL", _diffusers_version=DIFFUSERS_VERSION, in_channels=3, out_channels=3,
              down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
              block_out_channels=list(v.block_out_channels), layers_per_block=v.layers_per_block, act_fn="silu",
              latent_channels=v.latent_channels, norm_num_groups=v.norm_num_groups,
              sample_size=config.shapes.image_size, scaling_factor=float(scaling_factor), force_upcast=False,
              use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=True)


def unet_config(config, text_configs: tuple) -> dict:
  u = config.unet
  n = len(u.block_out_channels)
  factor = 2 ** (len(config.vae.block_out_channels) - 1)
  down = ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * (n - 1)
  return dict(_class_name="UNet2DConditionModel", _diffusers_version=DIFFUSERS_VERSION,
              sample_size=config.shapes.image_size // factor, in_channels=config.vae.latent_channels,
              out_channels=config.vae.latent_channels, down_block_types=down,
              up_block_types=["CrossAttnUpBlock2D"] * (n - 1) + ["UpBlock2D"],
              mid_block_type="UNetMidBlock2DCrossAttn", block_out_channels=list(u.block_out_channels),
              layers_per_block=u.layers_per_block, attention_head_dim=list(u.attention_heads),
              transformer_layers_per_block=list(u.transformer_layers_per_block),
              cross_attention_dim=sum(c["hidden_size"] for c in text_configs), use_linear_projection=True,
              norm_num_groups=u.norm_num_groups, flip_sin_to_cos=True, freq_shift=0, upcast_attention=False,
              addition_embed_type="text_time", addition_time_embed_dim=u.addition_time_embed_dim,
              projection_class_embeddings_input_dim=text_configs[1]["projection_dim"] + 6 * u.addition_time_embed_dim)


def scheduler_config(config) -> dict:
  """SDXL's scheduler (Euler, leading spacing, offset 1) on this config's noise schedule.

  clip_sample and set_alpha_to_one are written false, so that a DDIMScheduler made `from_config`
  of it neither clips x0 nor jumps to alpha 1 at the end (Euler ignores both).
  """
  s = config.schedule
  return dict(_class_name="EulerDiscreteScheduler", _diffusers_version=DIFFUSERS_VERSION,
              num_train_timesteps=s.num_train_timesteps, beta_start=s.beta_start, beta_end=s.beta_end,
              beta_schedule=s.beta_schedule, prediction_type=s.prediction_type, interpolation_type="linear",
              use_karras_sigmas=False, steps_offset=1, timestep_spacing="leading", trained_betas=None,
              clip_sample=False, set_alpha_to_one=False, sample_max_value=1.0)


MODEL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline", "_diffusers_version": DIFFUSERS_VERSION,
    "force_zeros_for_empty_prompt": True, "feature_extractor": [None, None], "image_encoder": [None, None],
    "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"]}


# ---- data --------------------------------------------------------------------------------------


def examples(config, stream: int, start: int, n: int):
  """Examples start .. start + n - 1 of data stream `stream`: (uint8 images, captions, scenes)."""
  return shapes_data.batch(config.seed * 1000 + stream, start, n, shapes_config(config))


def vae_batch(config, step: int, batch_size: int) -> np.ndarray:
  """Iteration `step`'s images for the VAE, NCHW in [-1, 1]."""
  return shapes_data.images_to_float(examples(config, VAE_STREAM, step * batch_size, batch_size)[0])


def captioned_batch(config, tokenizer, step: int, batch_size: int):
  """Iteration `step`'s images (NCHW in [-1, 1]) and caption token ids for the denoiser."""
  pixels, captions, _ = examples(config, DENOISER_STREAM, step * batch_size, batch_size)
  ids = tokenizer(captions, padding="max_length", max_length=config.text.max_length, truncation=True,
                  return_tensors="np").input_ids
  return shapes_data.images_to_float(pixels), np.asarray(ids, np.int32)


# ---- stage 1: the VAE --------------------------------------------------------------------------


def object_mask(x):
  """1 where a pixel differs from the image's top-left pixel (the background: no object reaches the
  corners), else 0; x NCHW in [-1, 1]."""
  return (jnp.abs(x - x[:, :, :1, :1]).sum(axis=1, keepdims=True) > 0.05).astype(x.dtype)


def vae_loss(params, model: AutoencoderKL, x, key, kl_weight: float, object_weight: float):
  """Weighted L1 reconstruction through a posterior sample + kl_weight * KL(q(z|x) || N(0, I)).

  Objects cover a few percent of a shapes image; their pixels weigh `object_weight` times the
  background's, or a plain L1 spends most of its training on flat colour and blurs the shapes.
  """
  mean, logvar = model.apply({"params": params}, x, method=AutoencoderKL.encode)
  z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
  recon = model.apply({"params": params}, z, method=AutoencoderKL.decode)
  weight = 1.0 + (object_weight - 1.0) * object_mask(x)
  l1 = jnp.sum(weight * jnp.abs(recon - x)) / (jnp.sum(weight) * x.shape[1])
  kl = 0.5 * jnp.mean(mean**2 + jnp.exp(logvar) - 1.0 - logvar)
  return l1 + kl_weight * kl, {"l1": l1, "kl": kl}


def train_vae(config, workdir: str, progress: bool = True):
  """Trains (or resumes) the VAE in `workdir/vae`; returns its parameters."""
  v = config.vae
  model = AutoencoderKL(VAEConfig.from_dict(vae_config(config)))
  tx = pretrain.clipped_adam(v.learning_rate, v.num_iterations, v.warmup_steps)

  def init():
    params = model.init_params(jax.random.PRNGKey(config.seed))
    return {"params": params, "opt_state": tx.init(params)}

  @functools.partial(jax.jit, donate_argnums=(0,))
  def step_fn(state, x, step):
    key = rng.role_key(rng.iteration_key(config.seed, step), rng.Role.DIFFUSION_NOISE)
    (loss, aux), grads = jax.value_and_grad(vae_loss, has_aux=True)(state["params"], model, x, key, v.kl_weight,
                                                              v.object_weight)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}, dict(loss=loss, **aux)

  state = pretrain.fit(step_fn, init, lambda step: vae_batch(config, step, v.batch_size),
                       num_iterations=v.num_iterations, workdir=os.path.join(workdir, "vae"),
                       checkpoint_every=config.train.checkpoint_every, desc="vae", progress=progress)
  return state["params"]


def latent_scaling_factor(config, vae_params, num_images: int = 1024) -> float:
  """1 / std of the posterior-mean latents of held-out images (unit-variance latents for the UNet)."""
  model = AutoencoderKL(VAEConfig.from_dict(vae_config(config)))
  pixels, _, _ = examples(config, SCALING_STREAM, 0, num_images)
  z = jax.jit(model.latents_from_images)(vae_params, shapes_data.images_to_float(pixels))
  return float(1.0 / np.std(np.asarray(z, np.float64)))


# ---- stage 2: the UNet and the text encoders ---------------------------------------------------


class Denoiser:
  """The trained part of the pipeline, as pure functions of one tree {unet, text_encoder, text_encoder_2}."""

  def __init__(self, config, tokenizer, scaling_factor: float):
    self.config = config
    self.text_configs = text_encoder_configs(config, tokenizer)
    self.encoders = tuple(CLIPTextEncoder(ClipConfig.from_dict(c)) for c in self.text_configs)
    self.unet_dict = unet_config(config, self.text_configs)
    self.unet = UNet2DConditionModel(UNetConfig.from_dict(self.unet_dict), attention_implementation="auto")
    self.vae = AutoencoderKL(VAEConfig.from_dict(vae_config(config, scaling_factor)))
    self.schedule = make_schedule(**config.schedule)
    size = config.shapes.image_size
    self.time_ids = sdxl_time_ids(1, (size, size), (0, 0), (size, size))

  def init(self, key):
    ids = jnp.zeros((1, self.config.text.max_length), jnp.int32)
    k1, k2, k3 = jax.random.split(key, 3)
    params = {name: enc.init(k, ids)["params"] for name, enc, k in
              zip(("text_encoder", "text_encoder_2"), self.encoders, (k1, k2))}
    side = self.unet_dict["sample_size"]
    cond = self.condition(params, ids)
    latents = jnp.zeros((1, self.unet_dict["in_channels"], side, side))
    params["unet"] = self.unet.init(k3, latents, jnp.zeros((1,), jnp.int32), cond["encoder_hidden_states"],
                                    added_cond_kwargs={"text_embeds": cond["text_embeds"],
                                                       "time_ids": cond["time_ids"]})["params"]
    return nn.meta.unbox(params)  # plain arrays: checkpoints restore without the model

  def condition(self, params, ids) -> dict:
    outputs = [enc.apply({"params": params[name]}, ids)
               for name, enc in zip(("text_encoder", "text_encoder_2"), self.encoders)]
    return sdxl_condition(outputs, jnp.tile(self.time_ids, (ids.shape[0], 1)))

  def unet_apply(self, unet_params, x_t, t, cond):
    return self.unet.apply({"params": unet_params}, x_t, t, cond["encoder_hidden_states"],
                           added_cond_kwargs={"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]})

  def loss(self, params, vae_params, x, ids, key):
    """The epsilon objective on posterior-sampled latents; captions dropped to zero embeddings."""
    z_key, loss_key = jax.random.split(key)
    latents = jax.lax.stop_gradient(self.vae.latents_from_images(vae_params, x, z_key))
    cond = self.condition(params, ids)
    uncond = {k: (v if k == "time_ids" else jnp.zeros_like(v)) for k, v in cond.items()}
    return pretrain.denoising_loss(params["unet"], self.unet_apply, self.schedule, latents, cond, uncond, loss_key,
                                   self.config.unet.cond_dropout)


def fit_denoiser(config, hp, workdir: str, init_params, loss, batch_fn, progress: bool = True):
  """Trains (or resumes) a denoiser tree in `workdir/denoiser` with clipped Adam and an EMA; returns the EMA.

  hp: learning_rate, num_iterations, warmup_steps, batch_size, ema_decay. `init_params(key)` makes the
  tree, `loss(params, batch, key)` is the objective, `batch_fn(step)` the host batch of an iteration.
  """
  tx = pretrain.clipped_adam(hp.learning_rate, hp.num_iterations, hp.warmup_steps)

  def init():
    params = init_params(jax.random.PRNGKey(config.seed + 1))
    return {"params": params, "ema": params, "opt_state": tx.init(params)}

  @functools.partial(jax.jit, donate_argnums=(0,))
  def step_fn(state, batch, step):
    key = rng.role_key(rng.iteration_key(config.seed, step), rng.Role.DIFFUSION_NOISE)
    value, grads = jax.value_and_grad(loss)(state["params"], batch, key)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    decay = jnp.minimum(hp.ema_decay, (1.0 + step) / (10.0 + step))  # short runs: no long memory of init
    ema = jax.tree.map(lambda e, p: e + (1.0 - decay) * (p - e), state["ema"], params)
    return {"params": params, "ema": ema, "opt_state": opt_state}, {"loss": value}

  state = pretrain.fit(step_fn, init, batch_fn, num_iterations=hp.num_iterations,
                       workdir=os.path.join(workdir, "denoiser"), checkpoint_every=config.train.checkpoint_every,
                       desc="denoiser", progress=progress)
  return state["ema"]


def train_denoiser(config, workdir: str, tokenizer, vae_params, scaling_factor: float, progress: bool = True):
  """Trains (or resumes) the UNet and both text encoders in `workdir/denoiser`; returns the EMA tree."""
  denoiser = Denoiser(config, tokenizer, scaling_factor)
  return fit_denoiser(config, config.unet, workdir, denoiser.init,
                      lambda params, batch, key: denoiser.loss(params, vae_params, *batch, key),
                      lambda step: captioned_batch(config, tokenizer, step, config.unet.batch_size), progress)


# ---- stage 3: the Diffusers folder -------------------------------------------------------------


def write_pipeline(config, out: str, tokenizer, vae_params, scaling_factor: float, denoiser_params) -> str:
  """The Diffusers SDXL folder at `out`, assembled in a staging folder and renamed into place."""
  text_configs = text_encoder_configs(config, tokenizer)
  configs = {"unet": unet_config(config, text_configs), "vae": vae_config(config, scaling_factor),
             "text_encoder": text_configs[0], "text_encoder_2": text_configs[1]}
  parent = os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  small = tempfile.mkdtemp(prefix=".small-files-", dir=parent)
  try:
    folders.write_json(os.path.join(small, folders.MODEL_INDEX), MODEL_INDEX)
    folders.write_json(os.path.join(small, "scheduler", "scheduler_config.json"), scheduler_config(config))
    for name, component_config in configs.items():
      folders.write_json(os.path.join(small, name, "config.json"), component_config)
    for name in ("tokenizer", "tokenizer_2"):
      tokenizer.save_pretrained(os.path.join(small, name))
    trees = {"unet": denoiser_params["unet"], "vae": vae_params, "text_encoder": denoiser_params["text_encoder"],
             "text_encoder_2": denoiser_params["text_encoder_2"]}
    d = describe(small)
    export_pipeline(small, trees, out, d.write_component, components=d.model_components)
  finally:
    shutil.rmtree(small, ignore_errors=True)
  return out


# ---- all stages --------------------------------------------------------------------------------


def train_evaluator(config, out: str) -> dict:
  """Trains the attribute classifier and saves it to `out`; returns its held-out figures."""
  e, data_config = config.evaluator, shapes_config(config)
  stats = {}
  params = evaluator.train_classifier(data_config, steps=e.num_iterations, batch_size=e.batch_size,
                                      seed=config.seed, stats=stats)
  pixels, _, scenes = shapes_data.batch(config.seed + 1, 10_000_000, e.held_out, data_config)
  held_out = float(evaluator.adherence(evaluator.predict(params, pixels), scenes))
  meta = {"config": data_config, "train_steps": e.num_iterations, "batch_size": e.batch_size, "seed": config.seed,
          "held_out_adherence": held_out, "train_seconds": stats["seconds"]}
  evaluator.save_classifier(out, params, meta)
  return meta


def write_prompts(config, workdir: str) -> None:
  """Distillation and evaluation captions, one per line, from streams the teacher never saw."""
  for name, stream, n in (("prompts_train.txt", TRAIN_PROMPT_STREAM, config.prompts.num_train),
                          ("prompts_eval.txt", EVAL_PROMPT_STREAM, config.prompts.num_eval)):
    captions = examples(config, stream, 0, n)[1]
    atomic_write_bytes(os.path.join(workdir, name), "".join(c + "\n" for c in captions).encode("utf-8"))


def pretrain_pipeline(config, workdir: str) -> str:
  """Runs every stage (resuming where a previous run stopped); returns the pipeline folder."""
  progress = config.train.progress
  tokenizer = make_tokenizer(config)
  vae_params = train_vae(config, workdir, progress)
  scaling = latent_scaling_factor(config, vae_params)
  logging.info("VAE latent scaling factor %.5f", scaling)
  denoiser_params = train_denoiser(config, workdir, tokenizer, vae_params, scaling, progress)
  out = write_pipeline(config, os.path.join(workdir, "pipeline"), tokenizer, vae_params, scaling, denoiser_params)
  evaluator_dir = os.path.join(workdir, "evaluator")
  if not os.path.isfile(os.path.join(evaluator_dir, evaluator.WEIGHTS_FILE)):
    logging.info("evaluator: %s", train_evaluator(config, evaluator_dir))
  write_prompts(config, workdir)
  return out
