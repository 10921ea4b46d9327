"""The embedded video teacher: a small CogVideoX-2B-style pipeline on the moving-shapes clips, trained with v-prediction.

`python -m tdm_jax.main --config=configs/shapes_cogvideox_teacher.py --workdir=DIR --mode=pretrain`
runs the stages below in order; each resumes from its own checkpoints, and a finished stage is not
run again:

  1. `base/`: the real `CogVideoXPipeline` layout without weights but for the text encoder's:
     model_index.json, CogVideoX's DDIM scheduler (the published CogVideoX-2B config but for
     `snr_shift_scale`, `config.schedule`), the PixArt-style shipped teacher's T5 encoder and its
     sentencepiece tokenizer (already trained on the shapes captions, whose words the video captions
     reuse or spell out in pieces; kept frozen), and the VAE's and transformer's config.json.
  2. `vae/`: an AutoencoderKLCogVideoX (3-D causal convolutions) trained on the clips: weighted L1
     reconstruction through a posterior sample + a light KL; then the latent scaling factor as
     1 / std of the posterior-mean latents of clips it was not trained on (as Stable Diffusion's
     scaling_factor was chosen). Its weights and final config are then written into `base/vae`.
  3. `denoiser/`: the CogVideoXTransformer3DModel (2B-style: 3-D sin-cos positions, no rotary),
     trained alone with the v objective on the CogVideoX schedule, on posterior-sampled, scaled
     latents in the transformer's (B, F, C, H, W) layout; captions are dropped to the encoding of ""
     (the negative prompt CogVideoX pipelines encode). The clips' posteriors are encoded once, a pool
     of `transformer.latent_pool` clips in `denoiser/latent_pool` (the 3-D VAE would otherwise cost more
     than the transformer in every step); a fresh posterior sample is drawn at every visit. The EMA ships.
  4. `pipeline/`: the complete Diffusers folder that stock `diffusers.CogVideoXPipeline` loads.
  5. `prompts_train.txt`, `prompts_eval.txt`: captions to distil on (train-split scenes of a stream the
     teacher never saw) and to evaluate with (held-out scenes, which no training clip shows).

Prompts go through CogVideoX's own encoding (`backbones.cogvideox.COGVIDEOX`): T5 states of prompts padded
to `text.max_sequence_length` tokens, with no attention mask (the pipeline passes none: T5 attends to the
padding and the transformer reads every state). A 2B-style transformer takes exactly
`max_text_seq_length` text tokens (its stored position table spans [text; video]), so the transformer's
max_text_seq_length is that length and every call of the teacher passes it as `max_sequence_length`.

Clips are `video_data`'s: 9 frames of 32 x 32; the VAE's temporal (`vae.temporal_compression_ratio`) and
4x spatial compression make 1 + 8 / ratio latent frames of `vae.latent_channels` x 8 x 8.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import shutil
import tempfile

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from absl import logging

from tdm_jax.convert import folders
from tdm_jax.convert.pipeline import export_pipeline
from tdm_jax.core import pretrain, rng
from tdm_jax.core.schedules import from_diffusers_config
from tdm_jax.infra.errors import ConfigError
from tdm_jax.infra.files import atomic_write_bytes
from tdm_jax.models import vae_cogvideox
from tdm_jax.models.cogvideox import CogVideoXConfig, CogVideoXTransformer3DModel
from tdm_jax.models.vae_cogvideox import AutoencoderKLCogVideoX, CogVideoXVAEConfig
from tdm_jax.tasks.diffusers import prompts as pipeline_prompts
from tdm_jax.tasks.diffusers.description import describe
from tdm_jax.tasks.diffusers.vaes import AUTOENCODER_KL_COGVIDEOX
from tdm_jax.tasks.shapes import teacher as sdxl_teacher
from tdm_jax.tasks.shapes import video_data

DIFFUSERS_VERSION = sdxl_teacher.DIFFUSERS_VERSION
ASSETS = os.path.join(sdxl_teacher.PACKAGE_DIR, "assets", "shapes_cogvideox")
SHIPPED_PIPELINE = os.path.join(ASSETS, "pipeline")
SHIPPED_EVALUATOR = os.path.join(ASSETS, "evaluator")
SHIPPED_TRAIN_PROMPTS = os.path.join(ASSETS, "prompts_train.txt")
SHIPPED_EVAL_PROMPTS = os.path.join(ASSETS, "prompts_eval.txt")
# Data streams (seed * 1000 + stream) of the video data, apart from the image teachers' 0..4.
VAE_STREAM, DENOISER_STREAM, SCALING_STREAM, TRAIN_PROMPT_STREAM, EVAL_PROMPT_STREAM = 10, 11, 12, 13, 14
DOWN_BLOCK, UP_BLOCK = vae_cogvideox.DOWN_BLOCK, vae_cogvideox.UP_BLOCK

MODEL_INDEX = {
    "_class_name": "CogVideoXPipeline", "_diffusers_version": DIFFUSERS_VERSION,
    "scheduler": ["diffusers", "CogVideoXDDIMScheduler"], "text_encoder": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "T5Tokenizer"], "transformer": ["diffusers", "CogVideoXTransformer3DModel"],
    "vae": ["diffusers", "AutoencoderKLCogVideoX"]}


# ---- component configs, in the Diffusers config.json form -------------------------------------------


def video_config(config) -> video_data.VideoShapesConfig:
  return video_data.VideoShapesConfig(image_size=config.shapes.image_size, frames=config.shapes.frames)


def scheduler_config(config) -> dict:
  """THUDM/CogVideoX-2b's scheduler_config.json but for `snr_shift_scale` (config.schedule)."""
  return dict(_class_name="CogVideoXDDIMScheduler", _diffusers_version=DIFFUSERS_VERSION, beta_end=0.012,
              beta_schedule="scaled_linear", beta_start=0.00085, clip_sample=False, clip_sample_range=1.0,
              num_train_timesteps=1000, prediction_type="v_prediction", rescale_betas_zero_snr=True,
              sample_max_value=1.0, set_alpha_to_one=True, snr_shift_scale=float(config.schedule.snr_shift_scale),
              steps_offset=0, timestep_spacing="trailing", trained_betas=None)


def vae_config(config, scaling_factor: float = 1.0) -> dict:
  """The AutoencoderKLCogVideoX config.json: the first log2(`vae.temporal_compression_ratio`) blocks halve
  time and every block but the last halves space."""
  v = config.vae
  n = len(v.block_out_channels)
  return dict(_class_name="AutoencoderKLCogVideoX", _diffusers_version=DIFFUSERS_VERSION, in_channels=3,
              out_channels=3, down_block_types=[DOWN_BLOCK] * n, up_block_types=[UP_BLOCK] * n,
              block_out_channels=list(v.block_out_channels), latent_channels=v.latent_channels,
              layers_per_block=v.layers_per_block, act_fn="silu", norm_eps=1e-6, norm_num_groups=v.norm_num_groups,
              temporal_compression_ratio=int(v.temporal_compression_ratio), sample_height=config.shapes.image_size,
              sample_width=config.shapes.image_size, scaling_factor=float(scaling_factor), shift_factor=None,
              latents_mean=None, latents_std=None, force_upcast=False, use_quant_conv=False,
              use_post_quant_conv=False, invert_scale_latents=False)


def transformer_config(config, vae: dict, text_dim: int) -> dict:
  """The 2B-style CogVideoXTransformer3DModel config.json (3-D sin-cos positions)."""
  m, vae_cfg = config.transformer, CogVideoXVAEConfig.from_dict(vae)
  side = config.shapes.image_size // vae_cfg.spatial_factor
  return dict(_class_name="CogVideoXTransformer3DModel", _diffusers_version=DIFFUSERS_VERSION,
              num_attention_heads=m.num_attention_heads, attention_head_dim=m.attention_head_dim,
              in_channels=vae["latent_channels"], out_channels=vae["latent_channels"], flip_sin_to_cos=True,
              freq_shift=0, time_embed_dim=m.time_embed_dim, ofs_embed_dim=None, text_embed_dim=int(text_dim),
              num_layers=m.num_layers, dropout=0.0, attention_bias=True, sample_width=side, sample_height=side,
              sample_frames=config.shapes.frames, patch_size=m.patch_size, patch_size_t=None,
              temporal_compression_ratio=vae_cfg.temporal_factor,
              max_text_seq_length=int(config.text.max_sequence_length), activation_fn="gelu-approximate",
              timestep_activation_fn="silu", norm_elementwise_affine=True, norm_eps=1e-5,
              spatial_interpolation_scale=float(m.spatial_interpolation_scale), temporal_interpolation_scale=1.0,
              use_rotary_positional_embeddings=False, use_learned_positional_embeddings=False, patch_bias=True)


# ---- initialisation and noise ------------------------------------------------------------------------
#
# With jax 0.10's default (partitionable threefry), XLA:CPU takes ~1 s to compile one random draw of a
# rank-4 shape and 3-4 s of a rank-5 one (flat: 0.3 s): Flax's init of a small VAE's ~200 tensors took
# 87 s to compile, video-shaped noise seconds per draw. Draws here are flat, one per tree or per tensor,
# then reshaped.


def normal(key, shape):
  """N(0, 1) of `shape`, drawn flat."""
  return jax.random.normal(key, (int(np.prod(shape)),)).reshape(shape)


def lecun_init(abstract, key):
  """A tree shaped as `abstract` (ShapeDtypeStructs) initialised as our models' layers initialise it (every
  kernel LeCun-normal, truncated at 2 std, over its fan-in prod(shape[:-1]); biases 0; norm scales 1) from
  one flat draw."""
  flat = flax.traverse_util.flatten_dict(abstract)
  bad = sorted("/".join(k) for k in flat if k[-1] not in ("kernel", "bias", "scale"))
  if bad:
    raise ValueError(f"no initialiser for parameter(s) {bad}")
  kernels = [k for k in sorted(flat) if k[-1] == "kernel"]
  total = sum(int(np.prod(flat[k].shape)) for k in kernels)
  # Flax's truncated_normal variance scaling: stddev sqrt(1 / fan_in) / .87962566103423978 on [-2, 2].
  draw = jax.random.truncated_normal(key, -2.0, 2.0, (total,), jnp.float32)
  out, start = {}, 0
  for k in kernels:
    a = flat[k]
    n, fan_in = int(np.prod(a.shape)), int(np.prod(a.shape[:-1]))
    out[k] = (draw[start:start + n] * (np.sqrt(1.0 / fan_in) / .87962566103423978)).reshape(a.shape).astype(a.dtype)
    start += n
  for k, a in flat.items():
    if k[-1] != "kernel":
      out[k] = (jnp.zeros if k[-1] == "bias" else jnp.ones)(a.shape, a.dtype)
  return flax.traverse_util.unflatten_dict(out)


def module_init(module, key, *args):
  """`module`'s parameters for inputs `args`, by `lecun_init` over `jax.eval_shape` of its init (traced, never
  compiled)."""
  abstract = nn.meta.unbox(jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args)["params"]))
  return lecun_init(abstract, key)


# ---- data ----------------------------------------------------------------------------------------


def clips(config, stream: int, start: int, n: int):
  """Clips start .. start + n - 1 of the train split of stream `stream`: (float (n, 3, F, H, W) in [-1, 1],
  captions)."""
  videos, captions, _ = video_data.batch(config.seed * 1000 + stream, start, n, video_config(config), split="train")
  return video_data.videos_to_float(videos, config.shapes.frames), captions


# ---- stage 1: the frozen components and the configs -------------------------------------------------


def write_base(config, out: str) -> str:
  """Stage 1: `out` holds the pipeline's small files, the T5 encoder's weights and every config.json."""
  pixart = config.t5_from
  parent = os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=".base-", dir=parent)
  try:
    folders.write_json(os.path.join(staging, folders.MODEL_INDEX), MODEL_INDEX)
    folders.write_json(os.path.join(staging, "scheduler", "scheduler_config.json"), scheduler_config(config))
    shutil.copytree(os.path.join(pixart, "text_encoder"), os.path.join(staging, "text_encoder"))
    shutil.copytree(os.path.join(pixart, "tokenizer"), os.path.join(staging, "tokenizer"))
    vae = vae_config(config)
    folders.write_json(os.path.join(staging, "vae", "config.json"), vae)
    t5 = folders.read_config(os.path.join(staging, "text_encoder"))
    folders.write_json(os.path.join(staging, "transformer", "config.json"),
                       transformer_config(config, vae, int(t5["d_model"])))
    if os.path.isdir(out):
      shutil.rmtree(out)
    os.rename(staging, out)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return out


# ---- stage 2: the VAE -----------------------------------------------------------------------------


def object_mask(x):
  """1 where a pixel differs from its clip's first-frame top-left pixel (the background: no object reaches
  the corners, moving or not), else 0; x (N, C, F, H, W) in [-1, 1]."""
  return (jnp.abs(x - x[:, :, :1, :1, :1]).sum(axis=1, keepdims=True) > 0.05).astype(x.dtype)


def vae_loss(params, vae: CogVideoXVAEConfig, x, key, kl_weight: float, object_weight: float):
  """Weighted L1 reconstruction through a posterior sample + kl_weight * KL(q(z|x) || N(0, I)); object pixels
  weigh `object_weight` times the background's (as the image teacher's VAE: objects cover a few percent)."""
  mean, logvar = vae_cogvideox.encode(params, x, vae)
  z = mean + jnp.exp(0.5 * logvar) * normal(key, mean.shape)
  recon = vae_cogvideox.decode(params, z, vae)
  weight = 1.0 + (object_weight - 1.0) * object_mask(x)
  l1 = jnp.sum(weight * jnp.abs(recon - x)) / (jnp.sum(weight) * x.shape[1])
  kl = 0.5 * jnp.mean(mean**2 + jnp.exp(logvar) - 1.0 - logvar)
  return l1 + kl_weight * kl, {"l1": l1, "kl": kl}


def train_vae(config, workdir: str, progress: bool = True):
  """Trains (or resumes) the VAE in `workdir/vae`; returns its parameters."""
  v = config.vae
  vae = CogVideoXVAEConfig.from_dict(vae_config(config))
  tx = pretrain.clipped_adam(v.learning_rate, v.num_iterations, v.warmup_steps)

  def init():
    model = AutoencoderKLCogVideoX(vae)
    params = module_init(model, jax.random.PRNGKey(config.seed), model.dummy_video())
    return {"params": params, "opt_state": tx.init(params)}

  @functools.partial(jax.jit, donate_argnums=(0,))
  def step_fn(state, x, step):
    key = rng.role_key(rng.iteration_key(config.seed, step), rng.Role.DIFFUSION_NOISE)
    (loss, aux), grads = jax.value_and_grad(vae_loss, has_aux=True)(state["params"], vae, x, key, v.kl_weight,
                                                                    v.object_weight)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}, dict(loss=loss, **aux)

  state = pretrain.fit(step_fn, init, lambda step: clips(config, VAE_STREAM, step * v.batch_size, v.batch_size)[0],
                       num_iterations=v.num_iterations, workdir=os.path.join(workdir, "vae"),
                       checkpoint_every=config.train.checkpoint_every, desc="vae", progress=progress)
  return state["params"]


def latent_scaling_factor(config, vae_params) -> float:
  """1 / std of the posterior-mean latents of `vae.scaling_clips` clips of a stream of their own."""
  v = config.vae
  vae = CogVideoXVAEConfig.from_dict(vae_config(config))
  encode = jax.jit(lambda p, x: vae_cogvideox.encode(p, x, vae)[0])
  latents = []
  for start in range(0, v.scaling_clips, v.batch_size):
    x, _ = clips(config, SCALING_STREAM, start, v.batch_size)  # a full batch (one compiled shape), cut below
    latents.append(np.asarray(encode(vae_params, x), np.float64)[:v.scaling_clips - start])
  return float(1.0 / np.std(np.concatenate(latents)))


def finish_vae(config, workdir: str, base: str, progress: bool = True) -> None:
  """Stage 2: trains the VAE (or resumes it), measures its scaling factor, and writes its weights and final
  config into `base/vae` (a finished stage: `base/vae` has weights; it is then not run again)."""
  if os.path.isfile(os.path.join(base, "vae", "diffusion_pytorch_model.safetensors")):
    return
  params = train_vae(config, workdir, progress)
  scaling = latent_scaling_factor(config, params)
  logging.info("CogVideoX VAE latent scaling factor %.5f", scaling)
  staging = tempfile.mkdtemp(prefix=".vae-", dir=os.path.dirname(os.path.abspath(base)))
  try:
    describe(base).write_component("vae", params, vae_config(config, scaling), staging)
    shutil.rmtree(os.path.join(base, "vae"))
    os.rename(staging, os.path.join(base, "vae"))
  finally:
    shutil.rmtree(staging, ignore_errors=True)


# ---- stage 3: the transformer -----------------------------------------------------------------------


POOL_SHARD = 1024  # clips per file of the latent pool


def _load_shard(path: str, size: int, vae_id: str):
  """A pool shard's arrays, or None when absent or made for another pool size or VAE."""
  if not os.path.isfile(path):
    return None
  with np.load(path) as shard:
    if str(shard["vae"]) != vae_id or len(shard["captions"]) != size:
      return None
    return {k: shard[k] for k in ("mean", "logvar", "captions")}


def encode_pool(config, workdir: str, vae_dir: str, progress: bool = True):
  """The first `transformer.latent_pool` clips of the denoiser's stream, encoded once by the trained VAE in
  `vae_dir`: (posterior mean, posterior logvar) each (N, C, F', h, w) float32, and the captions.

  Why a pool: the VAE's 3-D convolutions cost XLA:CPU more than the transformer's whole training step (32
  clips: 2.4 s to encode, 1.3 s for the transformer's step), so encoding every batch in the step, as the
  image teachers do, would more than double the stage. Each clip's posterior is drawn afresh at every visit,
  as training on the stream would. Written in shards of POOL_SHARD clips to `workdir/denoiser/latent_pool`
  (a killed run keeps the finished ones), each naming the VAE weights it came from (a shard of another VAE
  is encoded again)."""
  n, batch = config.transformer.latent_pool, config.transformer.batch_size
  folder = os.path.join(workdir, "denoiser", "latent_pool")
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(vae_dir, "diffusion_pytorch_model.safetensors"), "rb") as f:
    vae_id = hashlib.sha256(f.read()).hexdigest()
  vae = CogVideoXVAEConfig.from_dict(folders.read_config(vae_dir))
  vae_params = None
  encode = jax.jit(lambda p, x: vae_cogvideox.encode(p, x, vae))
  shards = []
  bar = tqdm.tqdm(total=n, desc="latent pool", unit="clip", dynamic_ncols=True, disable=not progress)
  for start in range(0, n, POOL_SHARD):
    stop = min(start + POOL_SHARD, n)
    path = os.path.join(folder, f"{start:08d}.npz")
    shard = _load_shard(path, stop - start, vae_id)
    if shard is None:
      if vae_params is None:
        vae_params = AUTOENCODER_KL_COGVIDEOX.params_from_state_dict(folders.load_state_dict(vae_dir), vae)
      means, logvars, captions = [], [], []
      for first in range(start, stop, batch):
        x, text = clips(config, DENOISER_STREAM, first, batch)  # a full batch (one compiled shape), cut below
        mean, logvar = jax.device_get(encode(vae_params, x))
        keep = min(batch, stop - first)
        means.append(mean[:keep])
        logvars.append(logvar[:keep])
        captions += text[:keep]
        bar.update(keep)
      shard = {"mean": np.concatenate(means), "logvar": np.concatenate(logvars), "captions": np.array(captions)}
      buffer = io.BytesIO()
      np.savez(buffer, vae=np.array(vae_id), **shard)
      atomic_write_bytes(path, buffer.getvalue())
    else:
      bar.update(stop - start)
    shards.append(shard)
  bar.close()
  return (np.concatenate([s["mean"] for s in shards]), np.concatenate([s["logvar"] for s in shards]),
          [str(c) for s in shards for c in s["captions"]])


@functools.lru_cache(maxsize=4)
def _order(seed: int, epoch: int, n: int) -> np.ndarray:
  return np.random.default_rng([seed, 7, epoch]).permutation(n)


def pool_indices(config, step: int, batch: int, n: int) -> np.ndarray:
  """Iteration `step`'s pool indices: epoch after epoch, each a permutation of its own (a function of the
  iteration, so a resumed run repeats the uninterrupted one)."""
  g = step * batch + np.arange(batch)
  return np.array([_order(config.seed, int(e), n)[i] for e, i in zip(g // n, g % n)])


class Denoiser:
  """The transformer as a pure function of its tree, conditioned through CogVideoX's prompt encoding on the
  frozen T5; latents from the trained VAE of `base` (its scaling factor)."""

  def __init__(self, config, base: str):
    self.config = config
    d = describe(base)
    self.family = d.family.with_max_length(int(config.text.max_sequence_length))
    d.backbone.check_family(d.denoiser_config, self.family)
    trees = {s.encoder: d.params_from_state_dict(s.encoder, folders.load_state_dict(
        folders.component_path(base, s.encoder))) for s in d.encoders}
    self.encoders = pipeline_prompts.encoder_modules(d, "float32", trees=jax.tree.map(jnp.asarray, trees))
    self.transformer_dict = d.denoiser_config_dict
    self.transformer = CogVideoXTransformer3DModel(CogVideoXConfig.from_dict(self.transformer_dict),
                                                   attention_implementation="auto")
    self.vae_config = CogVideoXVAEConfig.from_dict(d.vae_config_dict)
    self.schedule = from_diffusers_config(d.scheduler_config)
    self.image_size = (config.shapes.image_size,) * 2
    self.null_tokens = self.tokens([""])

  def tokens(self, captions) -> list:
    return pipeline_prompts.host_tokens(self.family, self.encoders, captions)

  def condition(self, tokens) -> dict:
    return pipeline_prompts.encode(self.family, self.encoders, [e.params for e in self.encoders], tokens,
                                   self.image_size)

  def latent_shape(self) -> tuple:
    """(F, C, H, W) of one clip's latents."""
    c, vae = self.transformer_dict, self.vae_config
    frames = (c["sample_frames"] - 1) // vae.temporal_factor + 1
    return (frames, c["in_channels"], c["sample_height"], c["sample_width"])

  def init(self, key):
    text = jnp.zeros((1, self.family.max_length, self.transformer_dict["text_embed_dim"]))
    return module_init(self.transformer, key, jnp.zeros((1,) + self.latent_shape()), jnp.zeros((1,), jnp.int32),
                       text)

  def velocity(self, params, x_t, t, cond):
    return self.transformer.apply({"params": params}, x_t, t, cond["encoder_hidden_states"])

  def latents(self, mean, logvar, key):
    """Scaled posterior samples of the VAE's (N, C, F', h, w) posteriors, in the transformer's (N, F', C, h, w)
    layout (as Diffusers' CogVideoX training: latent_dist.sample() * scaling_factor, then permuted)."""
    z = mean + jnp.exp(0.5 * logvar) * normal(key, mean.shape)
    return jnp.swapaxes(z * self.vae_config.scaling_factor, 1, 2)

  def loss(self, params, mean, logvar, tokens, key):
    """The v objective on the CogVideoX schedule; captions dropped to the encoding of ""."""
    z_key, loss_key = jax.random.split(key)
    latents = self.latents(mean, logvar, z_key)
    cond = jax.lax.stop_gradient(self.condition(tokens))
    null = jax.lax.stop_gradient(self.condition(self.null_tokens))
    uncond = jax.tree.map(lambda n, c: jnp.broadcast_to(n, c.shape), null, cond)
    return pretrain.denoising_loss(params, self.velocity, self.schedule, latents, cond, uncond, loss_key,
                                   self.config.transformer.cond_dropout,
                                   min_snr_gamma=self.config.transformer.min_snr_gamma)


def pool_batch(config, denoiser: Denoiser, pool, step: int, batch: int):
  """Iteration `step`'s (posterior mean, posterior logvar, T5 tokens) from the latent pool."""
  mean, logvar, captions = pool
  idx = pool_indices(config, step, batch, len(captions))
  tokens = denoiser.tokens([captions[i] for i in idx])
  if (tokens[0]["ids"][:, -1] != 0).any():
    raise ConfigError(f"a caption of iteration {step} fills text.max_sequence_length="
                      f"{config.text.max_sequence_length} T5 tokens; raise it")
  return mean[idx], logvar[idx], tokens


def train_denoiser(config, workdir: str, denoiser: Denoiser, pool, progress: bool = True):
  """Trains (or resumes) the transformer in `workdir/denoiser` on the latent pool; returns the EMA tree."""
  return sdxl_teacher.fit_denoiser(
      config, config.transformer, workdir, denoiser.init,
      lambda params, batch, key: denoiser.loss(params, *batch, key),
      lambda step: pool_batch(config, denoiser, pool, step, config.transformer.batch_size), progress)


# ---- stage 4: the Diffusers folder ------------------------------------------------------------------


def write_pipeline(base: str, out: str, transformer_params) -> str:
  """The whole CogVideoXPipeline folder at `out`: `base` plus the transformer's weights."""
  d = describe(base)
  trees = {"transformer": transformer_params}
  for name in d.model_components:
    if name != "transformer":
      trees[name] = d.params_from_state_dict(name, folders.load_state_dict(folders.component_path(base, name)))
  return export_pipeline(base, trees, out, d.write_component, components=d.model_components)


# ---- stage 5: the captions of the main command --------------------------------------------------


def write_prompts(config, workdir: str) -> None:
  """`prompts.num_train` train-split captions to distil on and `prompts.num_eval` held-out ones to evaluate
  with, one per line, from streams of their own."""
  for name, stream, n, split in (("prompts_train.txt", TRAIN_PROMPT_STREAM, config.prompts.num_train, "train"),
                                 ("prompts_eval.txt", EVAL_PROMPT_STREAM, config.prompts.num_eval, "eval")):
    captions, _ = video_data.examples(config.seed * 1000 + stream, 0, n, video_config(config), split=split)
    atomic_write_bytes(os.path.join(workdir, name), "".join(c + "\n" for c in captions).encode("utf-8"))


def pretrain_pipeline(config, workdir: str) -> str:
  """Runs every stage (resuming where a previous run stopped); returns the pipeline folder."""
  base = os.path.join(workdir, "base")
  if not os.path.isfile(os.path.join(base, folders.MODEL_INDEX)):
    write_base(config, base)
  finish_vae(config, workdir, base, config.train.progress)
  pool = encode_pool(config, workdir, os.path.join(base, "vae"), config.train.progress)
  denoiser = Denoiser(config, base)
  logging.info("CogVideoX transformer %s", json.dumps(denoiser.transformer_dict))
  params = train_denoiser(config, workdir, denoiser, pool, config.train.progress)
  out = write_pipeline(base, os.path.join(workdir, "pipeline"), params)
  write_prompts(config, workdir)
  return out
