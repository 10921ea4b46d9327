"""The text encoders a pipeline can hold, by their Transformers class: CLIP (SD, SDXL, SD3) and T5
(PixArt, SD3, CogVideoX). Each kind says how its config is read, its Flax module and abstract
parameters, its converter, its tokenizer (from the real `tokenizer*/` folder, or a stand-in for
shape-only runs without files) and how prompts become its token ids and mask.

Which encoders a pipeline has, and how their outputs become the denoiser's conditioning, is the
pipeline family's business (`prompts.py`); this module knows one encoder at a time.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import types
import weakref
import zlib
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from tdm_jax.convert import clip as clip_io
from tdm_jax.convert import folders
from tdm_jax.convert import t5 as t5_io
from tdm_jax.models.clip import ClipConfig, CLIPTextEncoder
from tdm_jax.models.t5 import T5Config, T5Encoder

PyTree = Any


class StandInTokenizer:
  """Token ids without tokenizer files, for shape-only runs (random weights, no pipeline folder).

  Each word becomes one id (a CRC32 of the word modulo the vocabulary), after an optional start
  token and before the end token, padded with `pad`: deterministic ids of the right shape and
  range, so timing and memory are real; the meaning of the prompt is not.
  """

  def __init__(self, vocab_size: int, bos: Optional[int], eos: int, pad: int, model_max_length: int):
    self.vocab_size, self.bos, self.eos, self.pad = vocab_size, bos, eos, pad
    self.model_max_length = model_max_length

  def __call__(self, prompts, padding="max_length", max_length=None, truncation=True, return_tensors="np", **_):
    del padding, truncation, return_tensors
    length = max_length or self.model_max_length
    rows, masks = [], []
    for prompt in prompts:
      words = [zlib.crc32(w.encode("utf-8")) % self.vocab_size for w in prompt.lower().split()]
      ids = (([self.bos] if self.bos is not None else []) + words)[:length - 1] + [self.eos]
      masks.append([1] * len(ids) + [0] * (length - len(ids)))
      rows.append(ids + [self.pad] * (length - len(ids)))
    return types.SimpleNamespace(input_ids=np.asarray(rows, np.int32), attention_mask=np.asarray(masks, np.int32))


@dataclasses.dataclass(frozen=True)
class TextEncoderKind:
  """One kind of text encoder. `config` below is the kind's own config object.

  run(module, params, tokens) -> the encoder's outputs (a dict), jittable; tokens = {"ids", "mask"}.
  """
  name: str
  class_names: tuple
  config_from_dict: Callable[[Mapping[str, Any]], Any]
  module: Callable[..., Any]  # (config, dtype=...) -> flax module
  abstract_params: Callable[[Any], PyTree]
  params_from_state_dict: Callable[[Mapping[str, Any], Any], PyTree]
  state_dict_from_params: Callable[[PyTree, Any], dict]
  load_tokenizer: Callable[[str], Any]
  stand_in_tokenizer: Callable[[Any], StandInTokenizer]
  run: Callable[[Any, PyTree, dict], dict]
  weights_name: str = "model.safetensors"


def _abstract(module, length: int):
  return jax.eval_shape(functools.partial(module.init, jax.random.key(0)), jnp.zeros((1, length), jnp.int32))["params"]


def load_clip_tokenizer(path: str):
  """Transformers' CLIPTokenizer from a pipeline's tokenizer folder (vocab.json + merges.txt, or tokenizer.json)."""
  from transformers import CLIPTokenizer  # pylint: disable=g-import-not-at-top
  present = set(os.listdir(path))
  if not ({"vocab.json", "merges.txt"} <= present or "tokenizer.json" in present):
    raise folders.FolderError(f"{path} holds no CLIP tokenizer (vocab.json + merges.txt, or tokenizer.json); "
                              f"found {sorted(present)}")
  return CLIPTokenizer.from_pretrained(path)


CLIP = TextEncoderKind(
    name="clip",
    class_names=("CLIPTextModel", "CLIPTextModelWithProjection"),
    config_from_dict=ClipConfig.from_dict,
    module=lambda config, **kw: CLIPTextEncoder(config, **kw),
    abstract_params=lambda config: _abstract(CLIPTextEncoder(config), 1),
    params_from_state_dict=clip_io.clip_params_from_state_dict,
    state_dict_from_params=clip_io.clip_state_dict_from_params,
    load_tokenizer=load_clip_tokenizer,
    stand_in_tokenizer=lambda c: StandInTokenizer(c.vocab_size, c.bos_token_id or 0, c.eos_token_id, c.eos_token_id,
                                                  c.max_position_embeddings),
    run=lambda module, params, tokens: module.apply({"params": params}, tokens["ids"]),
)

T5 = TextEncoderKind(
    name="t5",
    class_names=("T5EncoderModel",),
    config_from_dict=T5Config.from_dict,
    module=lambda config, **kw: T5Encoder(config, **kw),
    abstract_params=lambda config: _abstract(T5Encoder(config), 1),
    params_from_state_dict=t5_io.t5_params_from_state_dict,
    state_dict_from_params=t5_io.t5_state_dict_from_params,
    load_tokenizer=t5_io.load_tokenizer,
    stand_in_tokenizer=lambda c: StandInTokenizer(c.vocab_size, None, c.eos_token_id, c.pad_token_id, 512),
    run=lambda module, params, tokens: {"last_hidden_state": module.apply({"params": params}, tokens["ids"],
                                                                          tokens["mask"])},
)

KINDS = {name: kind for kind in (CLIP, T5) for name in kind.class_names}


def kind_for(class_name: str, component: str) -> TextEncoderKind:
  if class_name not in KINDS:
    raise folders.FolderError(f"{component} is a {class_name}; supported text encoders: {', '.join(sorted(KINDS))}")
  return KINDS[class_name]


_TRUNCATION_WARNED = weakref.WeakSet()  # tokenizers that have said so once (a run keeps its tokenizers)


def tokenize(tokenizer, prompts: Sequence[str], max_length: Optional[int] = None, *, warn_as: str = "") -> dict:
  """{"ids", "mask"} (int32, (batch, length)): padded to `max_length` (default the tokenizer's
  model_max_length: 77 for CLIP) and truncated, as Diffusers' encode_prompt does. With `warn_as`
  (the encoder's name), the first prompts cut short by this tokenizer say so, once, as Diffusers warns."""
  length = max_length or tokenizer.model_max_length
  out = tokenizer(list(prompts), padding="max_length", max_length=length, truncation=True, return_tensors="np")
  mask = getattr(out, "attention_mask", None)
  if mask is None:
    mask = np.ones_like(out.input_ids)
  if warn_as and tokenizer not in _TRUNCATION_WARNED and not isinstance(tokenizer, StandInTokenizer):
    full = tokenizer(list(prompts), padding="longest", truncation=False).input_ids
    cut = [p for p, ids in zip(prompts, full) if len(ids) > length]
    if cut:
      _TRUNCATION_WARNED.add(tokenizer)
      logging.warning("%s can only handle sequences up to %d tokens: %d prompt(s) truncated, e.g. %r (further "
                      "truncations are not reported)", warn_as, length, len(cut), cut[0][:200])
  return {"ids": np.asarray(out.input_ids, np.int32), "mask": np.asarray(mask, np.int32)}
