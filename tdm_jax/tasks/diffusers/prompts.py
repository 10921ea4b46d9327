"""Prompt encoding per pipeline family (SD, SDXL, PixArt), as Diffusers' `encode_prompt` does it.

A family is keyed by the pipeline class in `model_index.json` and says which text encoders' outputs
make the denoiser's conditioning, how long its prompts are, what its negative branch is, and what a
stock Diffusers call of an exported student needs beyond the prompts, the step count and the latents.

- SD 1.5 / 2.x: one CLIP encoder; the UNet is conditioned on its last hidden state.
- SDXL: two encoders (CLIP ViT-L and OpenCLIP bigG with projection); the UNet gets their penultimate
  hidden states side by side (768 + 1280 = 2048), bigG's projected pooled embedding, and
  `add_time_ids` (original size, crop top-left, target size).
- PixArt-alpha / -Sigma: one T5 encoder, 120 (alpha) or 300 (Sigma) tokens with their attention mask
  (caption cleaning off); the transformer also gets the image's resolution and aspect ratio, which
  only the 1024-MS models read. Stock PixArt pipelines have no slot that turns guidance off, so their
  call says guidance_scale=1 (and no resolution binning: the latents given are the size sampled).

Negative embeddings are zeros when the pipeline's `force_zeros_for_empty_prompt` says so and no
negative prompt is given (SDXL); otherwise the negatives ("" by default) are encoded.
Host side: tokens; device side: `encode`, a pure function of the encoders' parameters, so the
training step runs the text encoders inside the compiled step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import jax.numpy as jnp
import numpy as np

from tdm_jax.convert import folders
from tdm_jax.infra.errors import ConfigError
from tdm_jax.tasks.diffusers import text_encoders

PyTree = Any


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


def _sd(outputs, tokens, batch, image_size):
  del tokens, batch, image_size
  return {"encoder_hidden_states": outputs[0]["last_hidden_state"]}


def _sdxl(outputs, tokens, batch, image_size):
  del tokens
  return sdxl_condition(outputs, sdxl_time_ids(batch, image_size, (0, 0), image_size))


def _pixart(outputs, tokens, batch, image_size):
  height, width = image_size
  return {"encoder_hidden_states": outputs[0]["last_hidden_state"], "encoder_attention_mask": tokens[0]["mask"],
          "resolution": jnp.tile(jnp.asarray([[height, width]], jnp.float32), (batch, 1)),
          "aspect_ratio": jnp.full((batch, 1), height / width, jnp.float32)}


@dataclasses.dataclass(frozen=True)
class PipelineFamily:
  """How one family of pipelines encodes prompts, and how a stock call samples its exported students.

  encode(encoder outputs, tokens, batch, image_size) -> the denoiser's cond (jittable).
  kept_in_zeros: cond entries that `force_zeros_for_empty_prompt` keeps in the negative branch.
  """
  name: str
  encode: Callable
  encoders: str  # what the family needs, for the error when a folder lacks it
  max_length: Optional[int] = None  # tokens per prompt; None: the tokenizer's model_max_length
  uses_mask: bool = False  # whether the denoiser reads the tokens' attention mask
  needs_projection: bool = False  # SDXL's pooled embedding
  kept_in_zeros: tuple = ()
  stock_load: tuple = ()  # (key, value) pairs for DiffusionPipeline.from_pretrained
  stock_call: tuple = ()  # (key, value) pairs for the stock call of an exported student

  def unconditional(self, cond: dict) -> dict:
    """The negative branch of pipelines with `force_zeros_for_empty_prompt`: zero embeddings."""
    return {k: (v if k in self.kept_in_zeros else jnp.zeros_like(v)) for k, v in cond.items()}


SD = PipelineFamily("sd", _sd, "one CLIP text encoder")
SDXL = PipelineFamily("sdxl", _sdxl, "CLIP text encoders, one with projection", needs_projection=True,
                      kept_in_zeros=("time_ids",), stock_load=(("add_watermarker", False),))
_PIXART_CALL = (("guidance_scale", 1.0), ("use_resolution_binning", False), ("clean_caption", False))
PIXART_ALPHA = PipelineFamily("pixart", _pixart, "one T5 text encoder", max_length=120, uses_mask=True,
                              kept_in_zeros=("encoder_attention_mask", "resolution", "aspect_ratio"),
                              stock_call=_PIXART_CALL)
PIXART_SIGMA = dataclasses.replace(PIXART_ALPHA, max_length=300)

# Pipeline classes by prefix (Diffusers' img2img / inpaint variants encode prompts as their base does).
FAMILIES = (("StableDiffusionXL", SDXL), ("StableDiffusion", SD), ("PixArtSigma", PIXART_SIGMA),
            ("PixArtAlpha", PIXART_ALPHA))


def family_for(pipeline_class: str) -> PipelineFamily:
  for prefix, family in FAMILIES:
    if pipeline_class.startswith(prefix):
      return family
  raise ConfigError(f"model_index.json names the pipeline class {pipeline_class!r}; tdm_jax encodes prompts for "
                    f"{', '.join(p + '*' for p, _ in FAMILIES)} pipelines")


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
  for e in encoders:
    tokens = text_encoders.tokenize(e.tokenizer, prompts, family.max_length, warn_as=e.name)
    out.append(tokens if family.uses_mask else {"ids": tokens["ids"]})
  return out


def encode(family: PipelineFamily, encoders: Sequence[TextEncoder], params: Sequence[PyTree], tokens: list,
           image_size) -> dict:
  """The denoiser's cond from per-encoder tokens and weights: pure and jittable."""
  tokens = [{k: jnp.asarray(v) for k, v in t.items()} for t in tokens]
  for t in tokens:
    t.setdefault("mask", jnp.ones_like(t["ids"]))
  outputs = [e.kind.run(e.module, p, t) for e, p, t in zip(encoders, params, tokens)]
  return family.encode(outputs, tokens, tokens[0]["ids"].shape[0], tuple(image_size))


@dataclasses.dataclass(frozen=True)
class PromptEncoder:
  """Prompts -> (cond, uncond) for the pipeline's denoiser, on the host (evaluation, sampling)."""
  family: PipelineFamily
  encoders: tuple
  force_zeros_for_empty_prompt: bool = False
  image_size: tuple = (1024, 1024)

  @classmethod
  def from_description(cls, d, trees: dict, image_size=None, dtype="float32") -> "PromptEncoder":
    """The prompt path of pipeline description `d` over its converted `trees` (no second read of weights);
    image_size defaults to the denoiser's own resolution."""
    side = d.default_resolution()
    return cls(d.family, encoder_modules(d, dtype, trees=trees), d.force_zeros_for_empty_prompt,
               tuple(image_size or (side, side)))

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
