"""Prompt encoding, as Diffusers' `encode_prompt` does it, for any pipeline family.

A `PipelineFamily` (one per pipeline class; each denoiser family's module in `backbones/` holds its own:
SD and SDXL beside the UNet, PixArt, SD3, CogVideoX) says which text encoders' outputs make the
denoiser's conditioning, how long its prompts are, whether the denoiser reads their mask, what its
negative branch is, and what a stock Diffusers call of an exported student needs beyond the prompts,
the step count and the latents.

Negative embeddings are zeros when the pipeline's `force_zeros_for_empty_prompt` says so and no
negative prompt is given (SDXL); otherwise the negatives ("" by default) are encoded.
Host side: tokens; device side: `encode`, a pure function of the encoders' parameters, so the
training step runs the text encoders inside the compiled step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence

import jax.numpy as jnp

from tdm_jax.convert import folders
from tdm_jax.infra.errors import ConfigError
from tdm_jax.tasks.diffusers import text_encoders

PyTree = Any


@dataclasses.dataclass(frozen=True)
class PipelineFamily:
  """How one family of pipelines encodes prompts, and how a stock call samples its exported students.

  encode(family, encoder outputs, tokens, batch, image_size) -> the denoiser's cond (jittable).
  kept_in_zeros: cond entries that `force_zeros_for_empty_prompt` keeps in the negative branch.
  Token lengths: T5 encoders take `max_length` tokens; CLIP encoders their tokenizer's
  model_max_length (77), or with `shared_clip_length` the first encoder's tokenizer's (SD3).
  """
  name: str
  encode: Callable
  encoders: str  # what the family needs, for the error when a folder lacks it
  max_length: Optional[int] = None  # T5's tokens per prompt; None: the tokenizer's model_max_length
  uses_mask: bool = False  # whether the denoiser reads the tokens' attention mask
  needs_projection: bool = False  # SDXL's pooled embedding: one encoder with projection
  projections: tuple = ()  # components that must each be a CLIPTextModelWithProjection (SD3)
  shared_clip_length: bool = False
  optional_components: tuple = ()  # components a folder may lack ([null, null] or no entry in its index)
  joint_attention_dim: Optional[int] = None  # SD3: T5's width, for its zero states when it is absent
  denoiser_fields: tuple = ()  # (field, denoiser config key, Diffusers' default) that `for_pipeline` fills
  stock_length_key: Optional[str] = None  # the pipeline's __call__ argument that `max_length` is
  kept_in_zeros: tuple = ()
  stock_load: tuple = ()  # (key, value) pairs for DiffusionPipeline.from_pretrained
  stock_call: tuple = ()  # (key, value) pairs for the stock call of an exported student
  # Stock-call arguments the run's latent geometry fills ("height", "width", "num_frames"): video pipelines
  # size their positions and frames from them, not from the latents they are given.
  stock_size_keys: tuple = ()

  def condition(self, outputs: Sequence[dict], tokens: list, batch: int, image_size) -> dict:
    """The denoiser's cond from the encoders' outputs (pipeline order) and their tokens: pure, jittable."""
    return self.encode(self, outputs, tokens, batch, tuple(image_size))

  def unconditional(self, cond: dict) -> dict:
    """The negative branch of pipelines with `force_zeros_for_empty_prompt`: zero embeddings."""
    return {k: (v if k in self.kept_in_zeros else jnp.zeros_like(v)) for k, v in cond.items()}

  def for_pipeline(self, index: Mapping[str, Any], denoiser_config: Mapping[str, Any]) -> "PipelineFamily":
    """This family for one pipeline folder: its denoiser's numbers the family reads (SD3's
    joint_attention_dim; CogVideoX's text length, which its stock call then passes), and its absent
    optional components as None in the stock load (Diffusers refuses a folder whose index says
    [null, null] unless told so)."""
    fields = {f: denoiser_config.get(key, default) for f, key, default in self.denoiser_fields}
    absent = tuple((name, None) for name in self.optional_components if not _listed(index, name))
    family = dataclasses.replace(self, **fields, stock_load=_updated(self.stock_load, absent))
    return family.with_max_length(int(fields["max_length"])) if "max_length" in fields else family

  def with_max_length(self, max_length: int) -> "PipelineFamily":
    """This family with T5 prompts of `max_length` tokens; the stock call of its exported students
    passes the same length where the pipeline takes one (SD3's max_sequence_length)."""
    if not isinstance(max_length, int) or max_length < 1:
      raise ConfigError(f"the prompt length must be a positive integer, got {max_length!r}")
    call = self.stock_call if self.stock_length_key is None else _updated(self.stock_call,
                                                                          ((self.stock_length_key, max_length),))
    return dataclasses.replace(self, max_length=max_length, stock_call=call)

  def token_length(self, encoders: Sequence["TextEncoder"], i: int) -> Optional[int]:
    """Tokens per prompt of encoder `i` of `encoders` (None: its tokenizer's model_max_length)."""
    if encoders[i].kind.name == text_encoders.T5.name:
      return self.max_length
    if self.shared_clip_length:
      return encoders[0].tokenizer.model_max_length
    return None


def _updated(pairs: tuple, new: tuple) -> tuple:
  """(key, value) pairs with `new`'s keys set (replaced in place, or appended)."""
  new = dict(new)
  out = tuple((k, new.pop(k) if k in new else v) for k, v in pairs)
  return out + tuple(new.items())


def _listed(index: Mapping[str, Any], name: str) -> bool:
  entry = index.get(name)
  return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] is not None


@dataclasses.dataclass(frozen=True)
class TextEncoder:
  """One of a pipeline's text encoders: its component name, kind, tokenizer, Flax module and weights."""
  name: str
  kind: text_encoders.TextEncoderKind
  tokenizer: Any
  module: Any
  params: PyTree = None


def encoder_modules(d, dtype, shape_only: bool = False, trees=None) -> tuple:
  """The text encoders of a pipeline description `d` (tokenizer, Flax module in `dtype`, and their
  weights from `trees` when given), in pipeline order. Shape-only runs have no tokenizer files: a
  stand-in makes ids of the right shape."""
  out = []
  for s in d.encoders:
    tokenizer = (s.kind.stand_in_tokenizer(s.config) if shape_only
                 else s.kind.load_tokenizer(folders.component_path(d.folder, s.tokenizer)))
    out.append(TextEncoder(s.encoder, s.kind, tokenizer, s.kind.module(s.config, dtype=jnp.dtype(dtype)),
                           None if trees is None else trees[s.encoder]))
  return tuple(out)


def host_tokens(family: PipelineFamily, encoders: Sequence[TextEncoder], prompts: Sequence[str]) -> list:
  """Per encoder, {"ids"} (+ "mask" when the family reads it) of the prompts: numpy, for the device."""
  out = []
  for i, e in enumerate(encoders):
    tokens = text_encoders.tokenize(e.tokenizer, prompts, family.token_length(encoders, i), warn_as=e.name)
    out.append(tokens if family.uses_mask else {"ids": tokens["ids"]})
  return out


def encode(family: PipelineFamily, encoders: Sequence[TextEncoder], params: Sequence[PyTree], tokens: list,
           image_size) -> dict:
  """The denoiser's cond from per-encoder tokens and weights: pure and jittable."""
  tokens = [{k: jnp.asarray(v) for k, v in t.items()} for t in tokens]
  for t in tokens:
    t.setdefault("mask", jnp.ones_like(t["ids"]))
  outputs = [e.kind.run(e.module, p, t) for e, p, t in zip(encoders, params, tokens)]
  return family.condition(outputs, tokens, tokens[0]["ids"].shape[0], image_size)


@dataclasses.dataclass(frozen=True)
class PromptEncoder:
  """Prompts -> (cond, uncond) for the pipeline's denoiser, on the host (evaluation, sampling)."""
  family: PipelineFamily
  encoders: tuple
  force_zeros_for_empty_prompt: bool = False
  image_size: tuple = (1024, 1024)

  @classmethod
  def from_description(cls, d, trees: dict, image_size=None, dtype="float32",
                       max_length: Optional[int] = None) -> "PromptEncoder":
    """The prompt path of pipeline description `d` over its converted `trees` (no second read of weights);
    image_size defaults to the denoiser's own resolution, max_length (T5's tokens) to the family's."""
    family = d.family if max_length is None else d.family.with_max_length(max_length)
    return cls(family, encoder_modules(d, dtype, trees=trees), d.force_zeros_for_empty_prompt,
               tuple(image_size or d.geometry().image_size))

  @property
  def kind(self) -> str:
    return self.family.name

  def _encode(self, prompts: Sequence[str]) -> dict:
    return encode(self.family, self.encoders, [e.params for e in self.encoders],
                  host_tokens(self.family, self.encoders, prompts), self.image_size)

  def __call__(self, prompts: Sequence[str], negative_prompts: Optional[Sequence[str]] = None):
    """(cond, uncond): the conditioning of the prompts and of their negatives ("" by default)."""
    # One string is one prompt (as in Diffusers), not a sequence of one-character prompts.
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
      raise ValueError("no prompts to encode")
    cond = self._encode(prompts)
    if negative_prompts is None and self.force_zeros_for_empty_prompt:
      return cond, self.family.unconditional(cond)
    if negative_prompts is None:
      negative_prompts = ""
    # One negative string applies to every prompt, as Diffusers' `batch_size * [negative_prompt]`.
    negatives = [negative_prompts] * len(prompts) if isinstance(negative_prompts, str) else list(negative_prompts)
    if len(negatives) != len(prompts):
      raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
    return cond, self._encode(negatives)
