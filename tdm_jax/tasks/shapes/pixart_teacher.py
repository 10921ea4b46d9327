"""The shipped transformer teacher, made from nothing: a small PixArt-alpha pipeline on the shapes data.

`python -m tdm_jax.main --config=configs/shapes_pixart_teacher.py --workdir=DIR --mode=pretrain` runs
the stages below in order; each resumes from its own checkpoints:

  1. `tokenizer/`: a T5 sentencepiece tokenizer (spiece.model, as PixArt's folders hold it) trained
     on the shapes captions.
  2. `denoiser/`: the PixArt transformer and a T5 encoder, trained together with the epsilon objective
     on PixArt's linear betas (1e-4..0.02) over the latents of the shipped SDXL-style pipeline's VAE
     (PixArt ships Stable Diffusion's VAE too); captions are dropped to the encoding of "" (what
     PixArt pipelines feed the unconditional branch) for classifier-free guidance. The EMA ships.
  3. `pipeline/`: the Diffusers `PixArtAlphaPipeline` folder (transformer/, text_encoder/, tokenizer/,
     vae/, scheduler/ with PixArt's DPM-Solver++ config), written by our own exporters.

The attribute evaluator and the prompt files are the SDXL-style teacher's (`teacher.py`): both
teachers are scored on the same held-out captions. The repository ships the folder under
`tdm_jax/assets/shapes_pixart/pipeline`.
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
from tdm_jax.convert import t5 as t5_io
from tdm_jax.convert import vae as vae_io
from tdm_jax.convert.pipeline import export_pipeline
from tdm_jax.core import pretrain
from tdm_jax.core.schedules import make_schedule
from tdm_jax.infra.errors import ConfigError
from tdm_jax.models.pixart import PixArtConfig, PixArtTransformer2DModel, pixart_alpha_init
from tdm_jax.models.t5 import T5Config, T5Encoder
from tdm_jax.models.vae import AutoencoderKL, VAEConfig
from tdm_jax.tasks.diffusers.backbones.pixart import PIXART_ALPHA
from tdm_jax.tasks.diffusers import text_encoders
from tdm_jax.tasks.diffusers.description import describe
from tdm_jax.tasks.shapes import data as shapes_data
from tdm_jax.tasks.shapes import teacher as sdxl_teacher

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tdm_jax/
SHIPPED_PIPELINE = os.path.join(PACKAGE_DIR, "assets", "shapes_pixart", "pipeline")
DIFFUSERS_VERSION = sdxl_teacher.DIFFUSERS_VERSION
PAD, EOS, UNK = "<pad>", "</s>", "<unk>"  # T5's spiece ids 0, 1, 2
MAX_LENGTH = PIXART_ALPHA.max_length  # what PixArtAlphaPipeline encodes (120 tokens)


# ---- the tokenizer -------------------------------------------------------------------------------


def write_t5_tokenizer(folder: str, texts, vocab_size: int, extra_ids: int = 0, model_max_length: int = 512,
                       model_type: str = "unigram"):
  """A T5 tokenizer folder as PixArt's hold it (spiece.model, tokenizer_config.json,
  special_tokens_map.json): a sentencepiece model trained on `texts` (pad 0, eos 1, unk 2, as T5's),
  plus `extra_ids` sentinels. Returns it loaded as our prompt path (and Diffusers) load it.
  model_type: "unigram" (T5's), or "bpe", which on a closed vocabulary keeps whole words as pieces
  (unigram training on one settles on near-character pieces)."""
  import sentencepiece  # pylint: disable=g-import-not-at-top
  os.makedirs(folder, exist_ok=True)
  with tempfile.TemporaryDirectory() as tmp:
    prefix = os.path.join(tmp, "spiece")
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)), model_prefix=prefix, model_type=model_type, vocab_size=vocab_size,
        hard_vocab_limit=False, character_coverage=1.0, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece=PAD,
        eos_piece=EOS, unk_piece=UNK, minloglevel=2)
    shutil.copyfile(prefix + ".model", os.path.join(folder, "spiece.model"))
  special = dict(eos_token=EOS, pad_token=PAD, unk_token=UNK,
                 additional_special_tokens=[f"<extra_id_{i}>" for i in range(extra_ids)])
  config = dict(special, extra_ids=extra_ids, model_max_length=model_max_length, sp_model_kwargs={}, legacy=True,
                clean_up_tokenization_spaces=True, tokenizer_class="T5Tokenizer")
  for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
    folders.write_json(os.path.join(folder, name), content)
  return t5_io.load_tokenizer(folder)


def make_tokenizer(config, folder: str):
  """The shapes captions' T5 tokenizer in `folder`; no caption word may fall to <unk> (checked)."""
  captions = sdxl_teacher.examples(config, sdxl_teacher.DENOISER_STREAM, 0, config.text.tokenizer_captions)[1]
  tokenizer = write_t5_tokenizer(folder, captions, config.text.vocab_size, model_type="bpe")
  unknown = [w for w in shapes_data.vocabulary() if tokenizer.unk_token_id in tokenizer(w).input_ids]
  if unknown:
    raise ConfigError(f"the T5 tokenizer trained on {len(captions)} captions maps {unknown[:6]} to <unk>; "
                      f"raise text.tokenizer_captions")
  return tokenizer


# ---- component configs, in the Diffusers / Transformers config.json form ---------------------------


def text_encoder_config(config, tokenizer) -> dict:
  t = config.text
  return dict(architectures=["T5EncoderModel"], model_type="t5", vocab_size=len(tokenizer), d_model=t.d_model,
              d_kv=t.d_kv, d_ff=t.d_ff, num_layers=t.num_layers, num_decoder_layers=t.num_layers, num_heads=t.num_heads,
              relative_attention_num_buckets=t.relative_attention_num_buckets,
              relative_attention_max_distance=t.relative_attention_max_distance, feed_forward_proj="gated-gelu",
              dense_act_fn="gelu_new", is_gated_act=True, layer_norm_epsilon=1e-6, dropout_rate=0.0,
              initializer_factor=1.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
              is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False, torch_dtype="float32")


def transformer_config(config, text_config: dict, latent_channels: int) -> dict:
  p = config.transformer
  factor = 2 ** (len(folders.read_config(os.path.join(config.vae_from, "vae"))["block_out_channels"]) - 1)
  return dict(_class_name="PixArtTransformer2DModel", _diffusers_version=DIFFUSERS_VERSION,
              num_attention_heads=p.num_attention_heads, attention_head_dim=p.attention_head_dim,
              in_channels=latent_channels, out_channels=2 * latent_channels, num_layers=p.num_layers, dropout=0.0,
              norm_num_groups=32, cross_attention_dim=p.num_attention_heads * p.attention_head_dim,
              attention_bias=True, sample_size=config.shapes.image_size // factor, patch_size=p.patch_size,
              activation_fn="gelu-approximate", num_embeds_ada_norm=1000, upcast_attention=False,
              norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=None,
              use_additional_conditions=None, caption_channels=text_config["d_model"], attention_type="default")


def scheduler_config(config) -> dict:
  """PixArt's own scheduler: DPM-Solver++ (2M) on its linear betas."""
  s = config.schedule
  return dict(_class_name="DPMSolverMultistepScheduler", _diffusers_version=DIFFUSERS_VERSION,
              num_train_timesteps=s.num_train_timesteps, beta_start=s.beta_start, beta_end=s.beta_end,
              beta_schedule=s.beta_schedule, prediction_type=s.prediction_type, algorithm_type="dpmsolver++",
              solver_order=2, solver_type="midpoint", lower_order_final=True, timestep_spacing="linspace",
              steps_offset=0, trained_betas=None, thresholding=False, use_karras_sigmas=False,
              final_sigmas_type="zero")


MODEL_INDEX = {
    "_class_name": "PixArtAlphaPipeline", "_diffusers_version": DIFFUSERS_VERSION,
    "scheduler": ["diffusers", "DPMSolverMultistepScheduler"], "text_encoder": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "T5Tokenizer"], "transformer": ["diffusers", "PixArtTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"]}


# ---- the transformer and the T5 encoder ------------------------------------------------------------


class Denoiser:
  """The trained part of the pipeline, as pure functions of one tree {transformer, text_encoder}."""

  def __init__(self, config, tokenizer, vae_config: dict):
    self.config = config
    self.text_config = text_encoder_config(config, tokenizer)
    self.encoder = T5Encoder(T5Config.from_dict(self.text_config))
    self.transformer_dict = transformer_config(config, self.text_config, vae_config["latent_channels"])
    self.transformer = PixArtTransformer2DModel(PixArtConfig.from_dict(self.transformer_dict),
                                                attention_implementation="auto")
    self.vae = AutoencoderKL(VAEConfig.from_dict(vae_config))
    self.schedule = make_schedule(**config.schedule)
    self.image_size = (config.shapes.image_size,) * 2
    null = text_encoders.tokenize(tokenizer, [""], MAX_LENGTH)  # the unconditional branch: "" encoded
    self.null_ids, self.null_mask = null["ids"], null["mask"]

  def init(self, key):
    """T5 as Transformers initialises it, the transformer as PixArt-alpha's training code does."""
    k1, k2, k3 = jax.random.split(key, 3)
    params = {"text_encoder": self.encoder.init(k1, jnp.asarray(self.null_ids), jnp.asarray(self.null_mask))["params"]}
    cond = self.condition(params, self.null_ids, self.null_mask)
    side = self.transformer_dict["sample_size"]
    latents = jnp.zeros((1, self.transformer_dict["in_channels"], side, side))
    transformer = self.transformer.init(k2, latents, jnp.zeros((1,), jnp.int32), **self._kwargs(cond))["params"]
    params["transformer"] = pixart_alpha_init(nn.meta.unbox(transformer), k3)
    return nn.meta.unbox(params)  # plain arrays: checkpoints restore without the model

  def condition(self, params, ids, mask) -> dict:
    states = self.encoder.apply({"params": params["text_encoder"]}, jnp.asarray(ids), jnp.asarray(mask))
    tokens = [{"ids": jnp.asarray(ids), "mask": jnp.asarray(mask)}]
    return PIXART_ALPHA.condition([{"last_hidden_state": states}], tokens, ids.shape[0],
                                                   self.image_size)

  @staticmethod
  def _kwargs(cond):
    return dict(encoder_hidden_states=cond["encoder_hidden_states"], encoder_attention_mask=cond["encoder_attention_mask"],
                resolution=cond["resolution"], aspect_ratio=cond["aspect_ratio"])

  def epsilon(self, transformer_params, x_t, t, cond):
    out = self.transformer.apply({"params": transformer_params}, x_t, t, **self._kwargs(cond))
    return out[:, :x_t.shape[1]]  # epsilon; the learned-variance channels are not trained

  def loss(self, params, vae_params, x, ids, mask, key):
    """The epsilon objective (min-SNR weighted with `transformer.min_snr_gamma`; 0 leaves it unweighted) on
    posterior-sampled latents; captions dropped to the encoding of ""."""
    z_key, loss_key = jax.random.split(key)
    latents = jax.lax.stop_gradient(self.vae.latents_from_images(vae_params, x, z_key))
    cond = self.condition(params, ids, mask)
    null = self.condition(params, self.null_ids[:, :ids.shape[1]], self.null_mask[:, :ids.shape[1]])
    uncond = jax.tree.map(lambda n, c: jnp.broadcast_to(n, c.shape), null, cond)  # "" once, for every row
    return pretrain.denoising_loss(params["transformer"], self.epsilon, self.schedule, latents, cond, uncond,
                                   loss_key, self.config.transformer.cond_dropout,
                                   min_snr_gamma=self.config.transformer.min_snr_gamma)


def captioned_batch(config, tokenizer, step: int, batch_size: int):
  """Iteration `step`'s images (NCHW in [-1, 1]), caption ids and masks (the SDXL-style teacher's stream).

  Tokens are padded to `text.train_length`, not the pipeline's 120: padding is masked out of T5's and
  the transformer's attention, so the function learned is the same and each step 4x cheaper."""
  pixels, captions, _ = sdxl_teacher.examples(config, sdxl_teacher.DENOISER_STREAM, step * batch_size, batch_size)
  tokens = text_encoders.tokenize(tokenizer, captions, config.text.train_length)
  if tokens["mask"][:, -1].any():
    raise ConfigError(f"a caption of iteration {step} fills text.train_length={config.text.train_length} tokens; "
                      f"raise it (up to {MAX_LENGTH})")
  return shapes_data.images_to_float(pixels), tokens["ids"], tokens["mask"]


def train_denoiser(config, workdir: str, denoiser: Denoiser, tokenizer, vae_params, progress: bool = True):
  """Trains (or resumes) the transformer and the T5 encoder in `workdir/denoiser`; returns the EMA tree."""
  return sdxl_teacher.fit_denoiser(
      config, config.transformer, workdir, denoiser.init,
      lambda params, batch, key: denoiser.loss(params, vae_params, *batch, key),
      lambda step: captioned_batch(config, tokenizer, step, config.transformer.batch_size), progress)


# ---- the Diffusers folder --------------------------------------------------------------------------


def write_pipeline(config, out: str, tokenizer_dir: str, denoiser: Denoiser, params, vae_params) -> str:
  """The Diffusers PixArt folder at `out` (the VAE copied from `config.vae_from`), assembled in a
  staging folder and renamed into place."""
  parent = os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  small = tempfile.mkdtemp(prefix=".small-files-", dir=parent)
  try:
    folders.write_json(os.path.join(small, folders.MODEL_INDEX), MODEL_INDEX)
    folders.write_json(os.path.join(small, "scheduler", "scheduler_config.json"), scheduler_config(config))
    folders.write_json(os.path.join(small, "transformer", "config.json"), denoiser.transformer_dict)
    folders.write_json(os.path.join(small, "text_encoder", "config.json"), denoiser.text_config)
    shutil.copytree(os.path.join(config.vae_from, "vae"), os.path.join(small, "vae"),
                    ignore=shutil.ignore_patterns("*.safetensors"))
    shutil.copytree(tokenizer_dir, os.path.join(small, "tokenizer"))
    d = describe(small)
    trees = {"transformer": params["transformer"], "text_encoder": params["text_encoder"], "vae": vae_params}
    export_pipeline(small, trees, out, d.write_component, components=d.model_components)
  finally:
    shutil.rmtree(small, ignore_errors=True)
  return out


def pretrain_pipeline(config, workdir: str) -> str:
  """Runs every stage (resuming where a previous run stopped); returns the pipeline folder."""
  tokenizer_dir = os.path.join(workdir, "tokenizer")
  if os.path.isfile(os.path.join(tokenizer_dir, "spiece.model")):
    tokenizer = t5_io.load_tokenizer(tokenizer_dir)
  else:
    tokenizer = make_tokenizer(config, tokenizer_dir)
  vae_config = folders.read_config(os.path.join(config.vae_from, "vae"))
  vae_params = vae_io.vae_params_from_state_dict(folders.load_state_dict(os.path.join(config.vae_from, "vae")),
                                                 vae_config)
  denoiser = Denoiser(config, tokenizer, vae_config)
  logging.info("PixArt transformer %s, T5 %s", json.dumps(denoiser.transformer_dict), json.dumps(denoiser.text_config))
  params = train_denoiser(config, workdir, denoiser, tokenizer, vae_params, config.train.progress)
  return write_pipeline(config, os.path.join(workdir, "pipeline"), tokenizer_dir, denoiser, params, vae_params)
