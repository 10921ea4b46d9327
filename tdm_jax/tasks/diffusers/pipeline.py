"""A Diffusers text-to-image pipeline folder in Flax: its components, prompt encoding, and the
UNet call that TDM distils.

SD 1.5 / 2.x: one CLIP text encoder; the UNet is conditioned on its last hidden state.
SDXL: two encoders (CLIP ViT-L and OpenCLIP bigG with projection); the UNet gets their
penultimate hidden states side by side (768 + 1280 = 2048), bigG's projected pooled embedding,
and `add_time_ids` (original size, crop top-left, target size). Negative embeddings are zeros
when the pipeline's `force_zeros_for_empty_prompt` says so and no negative prompt is given.
"""

from __future__ import annotations

import dataclasses
import os
import types
import zlib
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tdm_jax.convert import folders
from tdm_jax.convert.clip import clip_params_from_state_dict
from tdm_jax.infra.errors import ConfigError
from tdm_jax.models.clip import ClipConfig, CLIPTextEncoder

PyTree = Any


@dataclasses.dataclass(frozen=True)
class TextEncoder:
  """A tokenizer and the CLIP text encoder it feeds, with its parameters."""
  tokenizer: Any
  model: CLIPTextEncoder
  params: PyTree

  def token_ids(self, prompts: Sequence[str], max_length: Optional[int] = None) -> np.ndarray:
    return token_ids(self.tokenizer, prompts, max_length)

  def __call__(self, input_ids) -> dict:
    return self.model.apply({"params": self.params}, jnp.asarray(input_ids, jnp.int32))


def token_ids(tokenizer, prompts: Sequence[str], max_length: Optional[int] = None) -> np.ndarray:
  """Padded to the tokenizer's model_max_length (77 for CLIP) and truncated, as Diffusers does."""
  length = max_length or tokenizer.model_max_length
  return np.asarray(tokenizer(list(prompts), padding="max_length", max_length=length, truncation=True,
                              return_tensors="np").input_ids, np.int32)


class StandInTokenizer:
  """Token ids without tokenizer files, for shape-only runs (random weights, no pipeline folder).

  Each word becomes one id (a CRC32 of the word modulo the vocabulary), between CLIP's start and
  end tokens and padded with the end token: deterministic ids of the right shape and range, so
  timing and memory are real; the meaning of the prompt is not.
  """

  def __init__(self, vocab_size: int, bos_token_id: int, eos_token_id: int, model_max_length: int = 77):
    self.vocab_size, self.bos, self.eos = vocab_size, bos_token_id, eos_token_id
    self.model_max_length = model_max_length

  def __call__(self, prompts, padding="max_length", max_length=None, truncation=True, return_tensors="np"):
    del padding, truncation, return_tensors
    length = max_length or self.model_max_length
    rows = []
    for prompt in prompts:
      words = [zlib.crc32(w.encode("utf-8")) % self.vocab_size for w in prompt.lower().split()]
      ids = ([self.bos] + words)[:length - 1] + [self.eos]
      rows.append(ids + [self.eos] * (length - len(ids)))
    return types.SimpleNamespace(input_ids=np.asarray(rows, np.int32))


def load_tokenizer(path: str):
  """Transformers' CLIPTokenizer from a pipeline's tokenizer folder (vocab.json + merges.txt, or tokenizer.json)."""
  from transformers import CLIPTokenizer  # pylint: disable=g-import-not-at-top
  present = set(os.listdir(path))
  if not ({"vocab.json", "merges.txt"} <= present or "tokenizer.json" in present):
    raise folders.FolderError(f"{path} holds no CLIP tokenizer (vocab.json + merges.txt, or tokenizer.json); "
                              f"found {sorted(present)}")
  return CLIPTokenizer.from_pretrained(path)


def load_text_encoder(folder: str, tokenizer_name: str, encoder_name: str, *, variant: Optional[str] = None,
                      allow_pickle: bool = False, dtype=jnp.float32) -> TextEncoder:
  """Loads `folder/tokenizer_name` and `folder/encoder_name` (config.json + weights) into a TextEncoder."""
  tokenizer = load_tokenizer(folders.component_path(folder, tokenizer_name))
  encoder_dir = folders.component_path(folder, encoder_name)
  config = ClipConfig.from_dict(folders.read_config(encoder_dir))
  state = folders.load_state_dict(encoder_dir, variant=variant, allow_pickle=allow_pickle)
  params = jax.tree.map(lambda x: jnp.asarray(x, dtype), clip_params_from_state_dict(state, config))
  return TextEncoder(tokenizer=tokenizer, model=CLIPTextEncoder(config, dtype=dtype), params=params)


def sdxl_time_ids(batch: int, original_size=(1024, 1024), crop_top_left=(0, 0), target_size=(1024, 1024)):
  """SDXL's micro-conditioning: (original h, w, crop top, left, target h, w) per sample."""
  row = np.asarray(tuple(original_size) + tuple(crop_top_left) + tuple(target_size), np.float32)
  return np.tile(row, (batch, 1))


def sdxl_condition(encoder_outputs: Sequence[dict], time_ids) -> dict:
  """SDXL's UNet conditioning from its text encoders' outputs, in pipeline order: the penultimate
  hidden states concatenated on features, and the projected pooled embedding ("text_embeds") of the
  first encoder that has a projection. A pure function, so training can differentiate through it."""
  pooled = next((out["text_embeds"] for out in encoder_outputs if "text_embeds" in out), None)
  if pooled is None:
    raise ConfigError("SDXL needs a text encoder with projection (CLIPTextModelWithProjection) for the "
                      "pooled embedding; none of this pipeline's encoders has one")
  return {"encoder_hidden_states": jnp.concatenate([out["hidden_states"][-2] for out in encoder_outputs], axis=-1),
          "text_embeds": pooled, "time_ids": jnp.asarray(time_ids)}


def unet_condition(kind: str, encoder_outputs: Sequence[dict], batch: int, image_size=(1024, 1024)) -> dict:
  """The UNet's conditioning from the text encoders' outputs: SD's last hidden state, or SDXL's
  (see `sdxl_condition`) with time ids for an uncropped `image_size` image. Pure and jittable."""
  if kind == "sd":
    return {"encoder_hidden_states": encoder_outputs[0]["last_hidden_state"]}
  return sdxl_condition(encoder_outputs, sdxl_time_ids(batch, image_size, (0, 0), image_size))


def unconditional(cond: dict) -> dict:
  """The negative branch of pipelines with `force_zeros_for_empty_prompt`: zero embeddings, same time ids."""
  return {k: (v if k == "time_ids" else jnp.zeros_like(v)) for k, v in cond.items()}


@dataclasses.dataclass(frozen=True)
class PromptEncoder:
  """Prompts -> the UNet's conditioning pytree, for SD (one encoder) or SDXL (two)."""
  encoders: tuple
  kind: str  # "sd" or "sdxl"
  force_zeros_for_empty_prompt: bool = False
  image_size: tuple = (1024, 1024)

  def _encode(self, prompts: Sequence[str]):
    outputs = [encoder(encoder.token_ids(prompts)) for encoder in self.encoders]
    return unet_condition(self.kind, outputs, len(prompts), self.image_size)

  def __call__(self, prompts: Sequence[str], negative_prompts: Optional[Sequence[str]] = None):
    """(cond, uncond): the conditioning of the prompts and of their negatives ("" by default)."""
    # One string is one prompt (as in Diffusers), not a sequence of one-character prompts.
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
      raise ValueError("no prompts to encode")
    cond = self._encode(prompts)
    if negative_prompts is None and self.force_zeros_for_empty_prompt:
      uncond = unconditional(cond)
    else:
      if negative_prompts is None:
        negative_prompts = ""
      # One negative string applies to every prompt, as Diffusers' `batch_size * [negative_prompt]`.
      negatives = ([negative_prompts] * len(prompts) if isinstance(negative_prompts, str)
                   else list(negative_prompts))
      if len(negatives) != len(prompts):
        raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
      uncond = self._encode(negatives)
    return cond, uncond


def load_prompt_encoder(folder: str, *, variant: Optional[str] = None, allow_pickle: bool = False,
                        image_size: Optional[tuple] = None, dtype=jnp.float32) -> PromptEncoder:
  """The prompt path of a pipeline folder, SD or SDXL as its model_index.json says."""
  index = folders.read_model_index(folder)
  load = lambda tok, enc: load_text_encoder(folder, tok, enc, variant=variant, allow_pickle=allow_pickle,
                                            dtype=dtype)
  if "text_encoder_2" in index:
    encoders = tuple(load(t, e) for t, e in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
                     if e in index and index[e] and index[e][0] is not None)
    kind = "sdxl"
    if not any(e.model.config.with_projection for e in encoders):
      raise folders.FolderError(
          f"{folder!r} is an SDXL pipeline (its {folders.MODEL_INDEX} lists text_encoder_2) but none of its "
          f"text encoders has a text projection for the pooled embedding; text_encoder_2 must be a "
          f"CLIPTextModelWithProjection (index entry: {index.get('text_encoder_2')!r})")
  else:
    encoders, kind = (load("tokenizer", "text_encoder"),), "sd"
  if image_size is None:
    unet_config = folders.read_config(folders.component_path(folder, "unet"))
    vae_config = folders.read_config(folders.component_path(folder, "vae"))
    factor = 2 ** (len(vae_config.get("block_out_channels", [0] * 4)) - 1)
    side = int(unet_config["sample_size"]) * factor
    image_size = (side, side)
  return PromptEncoder(encoders=encoders, kind=kind,
                       force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", False)),
                       image_size=tuple(image_size))
