"""CLIP text encoder in Flax (linen), equal to Transformers' `CLIPTextModel(WithProjection)`.

Transformers 5 has no Flax CLIP, so this one is ours. It serves SD1.5 (ViT-L/14 text tower)
and SDXL (ViT-L/14 plus OpenCLIP bigG/14 with its text projection).

Layout follows Transformers' parameter names so that conversion (`tdm_jax.convert.clip`) is a
rename plus a transpose of Linear weights:

  token_embedding/embedding            (vocab, D)
  position_embedding/embedding         (max_positions, D)
  layers_{i}/layer_norm1, self_attn/{q,k,v,out}_proj, layer_norm2, mlp/{fc1,fc2}
  final_layer_norm
  text_projection/kernel               (D, projection_dim), only when `with_projection`

Every parameter carries logical axis names (see `_AXES` below) for sharding rules elsewhere.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from tdm_jax.infra.errors import ConfigError
from tdm_jax.models import layers
from tdm_jax.models.attention import attention
from tdm_jax.models.remat import own_computation

ACTIVATIONS = ("quick_gelu", "gelu")


@dataclasses.dataclass(frozen=True)
class ClipConfig:
  """The fields of a Transformers `CLIPTextConfig` that the text encoder needs.

  Defaults are Transformers' `CLIPTextConfig` defaults. `with_projection` adds the
  `text_projection` (no bias) of `CLIPTextModelWithProjection`.
  """
  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  projection_dim: int = 512
  eos_token_id: int = 49407
  bos_token_id: Optional[int] = 49406
  pad_token_id: Optional[int] = 1
  with_projection: bool = False

  def __post_init__(self):
    if self.hidden_act not in ACTIVATIONS:
      raise ConfigError(f"CLIP hidden_act {self.hidden_act!r} is not supported; expected one of {ACTIVATIONS}")
    if self.hidden_size % self.num_attention_heads:
      raise ConfigError(f"CLIP hidden_size {self.hidden_size} is not divisible by "
                        f"num_attention_heads {self.num_attention_heads}")
    if not isinstance(self.eos_token_id, int):
      raise ConfigError(f"CLIP eos_token_id must be one integer, got {self.eos_token_id!r}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], **overrides) -> "ClipConfig":
    """From a Transformers `config.json` dict; unknown keys are ignored.

    `with_projection` defaults to whether `architectures` names `CLIPTextModelWithProjection`;
    keyword `overrides` win over both.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in d.items() if k in names}
    if "with_projection" not in kwargs:
      kwargs["with_projection"] = "CLIPTextModelWithProjection" in (d.get("architectures") or ())
    eos = kwargs.get("eos_token_id")
    if isinstance(eos, (list, tuple)) and len(eos) == 1:
      kwargs["eos_token_id"] = int(eos[0])
    kwargs.update(overrides)
    return cls(**kwargs)


def _activation(name: str, x: jax.Array) -> jax.Array:
  if name == "quick_gelu":
    return x * jax.nn.sigmoid(1.702 * x)
  return jax.nn.gelu(x, approximate=False)  # Transformers' "gelu" is the exact erf form.


class _Common(nn.Module):
  """Shared helpers for building annotated layers."""
  config: ClipConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def dense(self, features: int, axes, name: str, use_bias: bool = True) -> nn.Dense:
    return nn.Dense(
        features, use_bias=use_bias, dtype=self.dtype, param_dtype=self.param_dtype, **layers.BATCH_SPLIT_DENSE,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[-1],)),
        name=name)

  def layer_norm(self, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=self.config.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
        name=name)


class ClipAttention(_Common):
  """Multi-head self-attention, causal."""
  attention_implementation: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    b, l, _ = x.shape
    split = lambda t: t.reshape(b, l, c.num_attention_heads, c.head_dim)
    q = split(self.dense(c.hidden_size, ("embed", "heads"), "q_proj")(x))
    k = split(self.dense(c.hidden_size, ("embed", "heads"), "k_proj")(x))
    v = split(self.dense(c.hidden_size, ("embed", "heads"), "v_proj")(x))
    y = attention(q, k, v, causal=True, implementation=self.attention_implementation)
    return self.dense(c.hidden_size, ("heads", "embed"), "out_proj")(y.reshape(b, l, c.hidden_size))


class ClipMLP(_Common):

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    h = self.dense(c.intermediate_size, ("embed", "mlp"), "fc1")(x)
    h = _activation(c.hidden_act, h)
    return self.dense(c.hidden_size, ("mlp", "embed"), "fc2")(h)


class ClipEncoderLayer(_Common):
  """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""
  attention_implementation: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype)
    x = x + ClipAttention(**kw, attention_implementation=self.attention_implementation,
                          name="self_attn")(self.layer_norm("layer_norm1")(x))
    x = x + ClipMLP(**kw, name="mlp")(self.layer_norm("layer_norm2")(x))
    return x


class CLIPTextEncoder(_Common):
  """CLIP text transformer (+ optional projection), Transformers-exact.

  __call__(input_ids (B, L) int) returns a dict:
    last_hidden_state (B, L, D): after the final layer norm.
    hidden_states: tuple of num_hidden_layers + 1 arrays (B, L, D): the embeddings, then each
      layer's output, before the final layer norm (Transformers' `output_hidden_states=True`;
      SDXL conditions on hidden_states[-2]).
    pooled_output (B, D): last_hidden_state at the EOS position. As in Transformers 5: when
      `eos_token_id == 2` (legacy configs) the position of the largest token id, otherwise the
      first position equal to `eos_token_id` (position 0 when a row has none).
    text_embeds (B, projection_dim): pooled_output @ text_projection, only with `with_projection`.
  """
  attention_implementation: str = "auto"

  @nn.compact
  def __call__(self, input_ids: jax.Array) -> dict:
    c = self.config
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be (batch, length), got shape {input_ids.shape}")
    length = input_ids.shape[1]
    if length > c.max_position_embeddings:
      raise ValueError(f"sequence length {length} exceeds max_position_embeddings {c.max_position_embeddings}")
    emb_init = nn.initializers.normal(0.02)
    tokens = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                      embedding_init=nn.with_logical_partitioning(emb_init, ("vocab", "embed")),
                      name="token_embedding")
    positions = nn.Embed(c.max_position_embeddings, c.hidden_size, dtype=self.dtype,
                         param_dtype=self.param_dtype,
                         embedding_init=nn.with_logical_partitioning(emb_init, (None, "embed")),
                         name="position_embedding")
    x = tokens(input_ids) + positions(jnp.arange(length)[None, :])
    hidden_states = [x]
    for i in range(c.num_hidden_layers):
      layer = ClipEncoderLayer(config=c, dtype=self.dtype, param_dtype=self.param_dtype,
                               attention_implementation=self.attention_implementation, name=f"layers_{i}")
      x = own_computation(layer, x)
      hidden_states.append(x)
    last = self.layer_norm("final_layer_norm")(x)

    if c.eos_token_id == 2:
      eos_index = jnp.argmax(input_ids, axis=-1)
    else:
      eos_index = jnp.argmax((input_ids == c.eos_token_id).astype(jnp.int32), axis=-1)
    pooled = jnp.take_along_axis(last, eos_index[:, None, None], axis=1)[:, 0]

    out = dict(last_hidden_state=last, hidden_states=tuple(hidden_states), pooled_output=pooled)
    if c.with_projection:
      out["text_embeds"] = self.dense(c.projection_dim, ("embed", None), "text_projection",
                                      use_bias=False)(pooled)
    return out
