"""Prompt encoding per pipeline family (SD, SDXL, PixArt, SD3), as Diffusers' `encode_prompt` does it.

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
- SD3 / SD3.5: CLIP-L and CLIP-G with projection and T5 (text_encoder_3, optional). The CLIPs' penultimate
  hidden states side by side (768 + 1280), zero-padded on features to T5's width (the transformer's
  joint_attention_dim, 4096), then T5's last hidden state after them on the sequence axis (77 + 256
  tokens); the pooled projections are the two CLIPs' projected pooled embeddings side by side (2048).
  Both CLIPs take the first CLIP tokenizer's length; T5 takes `max_sequence_length` (256) tokens and,
  as in Diffusers, no attention mask (nor does the transformer). Without text_encoder_3 its states
  are zeros (batch, max_sequence_length, joint_attention_dim), as Diffusers makes them. No
  force_zeros_for_empty_prompt and no guidance-off slot: the stock call says guidance_scale=1.

Negative embeddings are zeros when the pipeline's `force_zeros_for_empty_prompt` says so and no
negative prompt is given (SDXL); otherwise the negatives ("" by default) are encoded.
Host side: tokens; device side: `encode`, a pure function of the encoders' parameters, so the
training step runs the text encoders inside the compiled step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence

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


def sd3_condition(encoder_outputs: Sequence[dict], batch: int, max_length: int,
                  joint_attention_dim: Optional[int]) -> dict:
  """SD3's transformer conditioning from its text encoders' outputs, in pipeline order (CLIP-L, CLIP-G,
  then T5 when the pipeline has it), as `StableDiffusion3Pipeline.encode_prompt` makes it (clip_skip
  None). Without T5, its states are zeros of (batch, max_length, joint_attention_dim). Pure."""
  clips = [out for out in encoder_outputs if "hidden_states" in out]  # T5's outputs have no per-layer states
  t5 = [out for out in encoder_outputs if "hidden_states" not in out]
  if len(clips) != 2 or len(t5) > 1:
    raise ConfigError(f"SD3 needs two CLIP text encoders and at most one T5; this pipeline's encoders give "
                      f"{len(clips)} CLIP and {len(t5)} T5 outputs")
  if any("text_embeds" not in out for out in clips):
    raise ConfigError("SD3's pooled projections need both CLIP text encoders with projection "
                      "(CLIPTextModelWithProjection)")
  clip = jnp.concatenate([out["hidden_states"][-2] for out in clips], axis=-1)
  if t5:
    states = t5[0]["last_hidden_state"]
    if joint_attention_dim is not None and states.shape[-1] != joint_attention_dim:
      raise ConfigError(f"text_encoder_3 gives {states.shape[-1]} features but the transformer's "
                        f"joint_attention_dim is {joint_attention_dim}")
  elif joint_attention_dim is None:
    raise ConfigError("an SD3 pipeline without text_encoder_3 needs the transformer's joint_attention_dim for "
                      "T5's zero states; the family has none (PipelineFamily.for_pipeline fills it)")
  else:
    states = jnp.zeros((batch, max_length, joint_attention_dim), clip.dtype)
  # torch.nn.functional.pad to T5's width: zeros on the right (a negative pad, never in real models, crops).
  width = states.shape[-1]
  if clip.shape[-1] <= width:
    clip = jnp.pad(clip, ((0, 0), (0, 0), (0, width - clip.shape[-1])))
  else:
    clip = clip[..., :width]
  return {"encoder_hidden_states": jnp.concatenate([clip, states], axis=1),
          "pooled_projections": jnp.concatenate([out["text_embeds"] for out in clips], axis=-1)}


def _sd(family, outputs, tokens, batch, image_size):
  del family, tokens, batch, image_size
  return {"encoder_hidden_states": outputs[0]["last_hidden_state"]}


def _sdxl(family, outputs, tokens, batch, image_size):
  del family, tokens
  return sdxl_condition(outputs, sdxl_time_ids(batch, image_size, (0, 0), image_size))


def _sd3(family, outputs, tokens, batch, image_size):
  del tokens, image_size
  return sd3_condition(outputs, batch, family.max_length, family.joint_attention_dim)


def _pixart(family, outputs, tokens, batch, image_size):
  del family
  height, width = image_size
  return {"encoder_hidden_states": outputs[0]["last_hidden_state"], "encoder_attention_mask": tokens[0]["mask"],
          "resolution": jnp.tile(jnp.asarray([[height, width]], jnp.float32), (batch, 1)),
          "aspect_ratio": jnp.full((batch, 1), height / width, jnp.float32)}


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

  def condition(self, outputs: Sequence[dict], tokens: list, batch: int, image_size) -> dict:
    """The denoiser's cond from the encoders' outputs (pipeline order) and their tokens: pure, jittable."""
    return self.encode(self, outputs, tokens, batch, tuple(image_size))

  def unconditional(self, cond: dict) -> dict:
    """The negative branch of pipelines with `force_zeros_for_empty_prompt`: zero embeddings."""
    return {k: (v if k in self.kept_in_zeros else jnp.zeros_like(v)) for k, v in cond.items()}

  def for_pipeline(self, index: Mapping[str, Any], denoiser_config: Mapping[str, Any]) -> "PipelineFamily":
    """This family for one pipeline folder: its denoiser's numbers the family reads (SD3's
    joint_attention_dim), and its absent optional components as None in the stock load (Diffusers
    refuses a folder whose index says [null, null] unless told so)."""
    fields = {f: denoiser_config.get(key, default) for f, key, default in self.denoiser_fields}
    absent = tuple((name, None) for name in self.optional_components if not _listed(index, name))
    return dataclasses.replace(self, **fields, stock_load=_updated(self.stock_load, absent))

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


SD = PipelineFamily("sd", _sd, "one CLIP text encoder")
SDXL = PipelineFamily("sdxl", _sdxl, "CLIP text encoders, one with projection", needs_projection=True,
                      kept_in_zeros=("time_ids",), stock_load=(("add_watermarker", False),))
_PIXART_CALL = (("guidance_scale", 1.0), ("use_resolution_binning", False), ("clean_caption", False))
PIXART_ALPHA = PipelineFamily("pixart", _pixart, "one T5 text encoder", max_length=120, uses_mask=True,
                              kept_in_zeros=("encoder_attention_mask", "resolution", "aspect_ratio"),
                              stock_length_key="max_sequence_length", stock_call=_PIXART_CALL)
PIXART_SIGMA = dataclasses.replace(PIXART_ALPHA, max_length=300)
SD3 = PipelineFamily("sd3", _sd3, "CLIP text encoders with projection in text_encoder and text_encoder_2, and "
                     "optionally a T5 in text_encoder_3", max_length=256,
                     projections=("text_encoder", "text_encoder_2"), shared_clip_length=True,
                     optional_components=("text_encoder_3", "tokenizer_3"),
                     denoiser_fields=(("joint_attention_dim", "joint_attention_dim", 4096),),
                     stock_length_key="max_sequence_length", stock_call=(("guidance_scale", 1.0),))

# Pipeline classes by prefix, the first match wins (Diffusers' img2img / inpaint variants encode prompts as
# their base does).
FAMILIES = (("StableDiffusionXL", SDXL), ("StableDiffusion3", SD3), ("StableDiffusion", SD),
            ("PixArtSigma", PIXART_SIGMA), ("PixArtAlpha", PIXART_ALPHA))


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
    side = d.default_resolution()
    family = d.family if max_length is None else d.family.with_max_length(max_length)
    return cls(family, encoder_modules(d, dtype, trees=trees), d.force_zeros_for_empty_prompt,
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
