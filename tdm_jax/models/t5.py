"""T5 v1.1 text encoder in Flax (linen), equal to Transformers' `T5EncoderModel`.

PixArt-alpha/Sigma, SD3 and CogVideoX condition on T5 v1.1 (XXL); Transformers 5 has no Flax T5, so
this one is ours. Layout follows Transformers' names so that conversion (`tdm_jax.convert.t5`) is a
rename plus a transpose of Linear weights:

  shared/embedding                       (vocab, d_model)
  relative_attention_bias                (num_buckets, heads)
  block_{i}/self_attention_norm, self_attention/{q,k,v,o}, feed_forward_norm,
            feed_forward/{wi_0,wi_1,wo} ("gated-gelu") or feed_forward/{wi,wo} ("relu")
  final_layer_norm

T5 keeps the bias table in the first layer's attention and shares the bias that layer computes with
the others. Here the encoder computes it once and passes it to every layer: the same numbers, and
every layer is the same module. Every parameter carries logical axis names for the sharding rules.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tdm_jax.infra.errors import ConfigError
from tdm_jax.models import layers
from tdm_jax.models.attention import IMPLEMENTATIONS
from tdm_jax.models.remat import own_computation

# feed_forward_proj -> (is_gated_act, dense_act_fn): the two feed-forwards T5 checkpoints use.
FEED_FORWARDS = {"gated-gelu": (True, "gelu_new"), "relu": (False, "relu")}


@dataclasses.dataclass(frozen=True)
class T5Config:
  """The fields of a Transformers `T5Config` that the encoder needs; defaults are Transformers'.

  `is_gated_act` and `dense_act_fn` follow from `feed_forward_proj` unless given (config.json
  files carry them, and Transformers lets them win).
  """
  vocab_size: int = 32128
  d_model: int = 512
  d_kv: int = 64
  d_ff: int = 2048
  num_layers: int = 6
  num_heads: int = 8
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "relu"
  is_gated_act: Optional[bool] = None
  dense_act_fn: Optional[str] = None
  pad_token_id: Optional[int] = 0
  eos_token_id: Optional[int] = 1

  def __post_init__(self):
    proj = self.feed_forward_proj
    gated = proj.split("-")[0] == "gated"
    act = "gelu_new" if proj == "gated-gelu" else proj.split("-")[-1]
    if self.is_gated_act is None:
      object.__setattr__(self, "is_gated_act", gated)
    if self.dense_act_fn is None:
      object.__setattr__(self, "dense_act_fn", act)
    supported = ", ".join(f"{k!r} (is_gated_act={g}, dense_act_fn={a!r})" for k, (g, a) in FEED_FORWARDS.items())
    if (self.is_gated_act, self.dense_act_fn) not in FEED_FORWARDS.values():
      key = "feed_forward_proj" if (gated, act) == (self.is_gated_act, self.dense_act_fn) else (
          "is_gated_act" if gated != self.is_gated_act else "dense_act_fn")
      raise ConfigError(f"T5 {key}={getattr(self, key)!r} (feed_forward_proj={proj!r}, is_gated_act="
                        f"{self.is_gated_act}, dense_act_fn={self.dense_act_fn!r}) is not supported; "
                        f"supported: {supported}")
    max_exact = self.relative_attention_num_buckets // 4
    if max_exact < 1 or self.relative_attention_max_distance <= max_exact:
      raise ConfigError(f"T5 relative_attention_num_buckets={self.relative_attention_num_buckets} and "
                        f"relative_attention_max_distance={self.relative_attention_max_distance} need "
                        f"num_buckets >= 4 and max_distance > num_buckets // 4")

  @property
  def inner_dim(self) -> int:
    return self.num_heads * self.d_kv

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], **overrides) -> "T5Config":
    """From a Transformers `config.json` dict; unknown keys are ignored, `overrides` win."""
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in d.items() if k in names}
    eos = kwargs.get("eos_token_id")
    if isinstance(eos, (list, tuple)) and len(eos) == 1:
      kwargs["eos_token_id"] = int(eos[0])
    kwargs.update(overrides)
    return cls(**kwargs)


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
  """(length, length) int32 bucket of key j for query i, bidirectional, as T5 computes them.

  Half the buckets for keys after the query; of each half, the first half exact distances and the
  rest logarithmic bins up to `max_distance`. Computed in numpy at trace time (the length is static),
  in float32 like Transformers, so that distances on a bin edge land in the same bucket.
  """
  rel = np.arange(length)[None, :] - np.arange(length)[:, None]
  half = num_buckets // 2
  buckets = (rel > 0).astype(np.int64) * half
  dist = np.abs(rel)
  max_exact = half // 2
  scaled = (np.log(np.maximum(dist, 1).astype(np.float32) / np.float32(max_exact))
            / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact))
  large = np.minimum(max_exact + scaled.astype(np.int64), half - 1)
  return (buckets + np.where(dist < max_exact, dist, large)).astype(np.int32)


class T5LayerNorm(nn.Module):
  """T5's RMS norm: no mean subtraction, no bias, the variance in float32."""
  epsilon: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, layers.NORM_AXES),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon)
    return y.astype(self.dtype) * scale.astype(self.dtype)


class _Layer(nn.Module):
  """Shared helpers of the annotated, bias-free T5 layers."""
  config: T5Config
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def dense(self, features: int, axes, name: str, std: float) -> nn.Dense:
    """`std`: Transformers' T5 init (initializer_factor 1). Real runs load checkpoints, but a T5 trained
    from nothing (the embedded PixArt teacher's) needs it: T5 has no 1/sqrt(d_kv) in its attention,
    the query init carries it, and without it the first logits are sqrt(d_kv) times too large."""
    return nn.Dense(features, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                    **layers.BATCH_SPLIT_DENSE, name=name,
                    kernel_init=nn.with_logical_partitioning(nn.initializers.normal(std), axes))

  def norm(self, name: str) -> T5LayerNorm:
    return T5LayerNorm(self.config.layer_norm_epsilon, self.dtype, self.param_dtype, name=name)


class T5Attention(_Layer):
  """Self-attention with the position bias added to the logits and no 1/sqrt(d) scale.

  Not `models.attention`: that takes a boolean mask only, and T5 adds a float bias to the logits
  (its scale is folded into the weights). A plain einsum, logits and softmax in float32.
  """

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, bias: jax.Array) -> jax.Array:
    c = self.config
    b, l, _ = x.shape
    stds = {"q": (c.d_model * c.d_kv) ** -0.5, "k": c.d_model ** -0.5, "v": c.d_model ** -0.5}
    q, k, v = (self.dense(c.inner_dim, ("embed", "heads"), n, stds[n])(x).reshape(b, l, c.num_heads, c.d_kv)
               for n in "qkv")
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) + bias
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    y = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, l, c.inner_dim)
    return self.dense(c.d_model, ("heads", "embed"), "o", c.inner_dim ** -0.5)(y)


class T5FeedForward(_Layer):
  """gelu_new(wi_0 x) * wi_1 x (gated, T5 v1.1) or relu(wi x) (original T5), then wo."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    if c.is_gated_act:
      h = jax.nn.gelu(self.dense(c.d_ff, ("embed", "mlp"), "wi_0", c.d_model ** -0.5)(x), approximate=True)  # tanh
      h = h * self.dense(c.d_ff, ("embed", "mlp"), "wi_1", c.d_model ** -0.5)(x)
    else:
      h = jax.nn.relu(self.dense(c.d_ff, ("embed", "mlp"), "wi", c.d_model ** -0.5)(x))
    return self.dense(c.d_model, ("mlp", "embed"), "wo", c.d_ff ** -0.5)(h)


class T5Block(_Layer):
  """x + attention(norm(x)) with the shared position bias, then x + feed_forward(norm(x))."""

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, bias: jax.Array) -> jax.Array:
    kw = dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype)
    x = x + T5Attention(**kw, name="self_attention")(self.norm("self_attention_norm")(x), mask, bias)
    return x + T5FeedForward(**kw, name="feed_forward")(self.norm("feed_forward_norm")(x))


class T5Encoder(nn.Module):
  """T5 encoder stack, Transformers-exact: `__call__(input_ids (B, L), attention_mask (B, L) or None)`
  -> last_hidden_state (B, L, d_model), after the final norm. Padded positions (mask 0) are not
  attended to; their own outputs are computed as Transformers computes them.

  `attention_implementation` is accepted for the same interface as the other models; T5's attention
  is always the plain path (see `T5Attention`).
  """
  config: T5Config
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_implementation: str = "auto"

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: Optional[jax.Array] = None) -> jax.Array:
    c = self.config
    if self.attention_implementation not in IMPLEMENTATIONS:
      raise ConfigError(f"attention implementation {self.attention_implementation!r} is not one of {IMPLEMENTATIONS}")
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be (batch, length), got shape {input_ids.shape}")
    length = input_ids.shape[1]
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, bool)
    if attention_mask.shape != input_ids.shape:
      raise ValueError(f"attention_mask shape {attention_mask.shape} differs from input_ids {input_ids.shape}")
    mask = jnp.asarray(attention_mask).astype(bool)[:, None, None, :]

    x = nn.Embed(c.vocab_size, c.d_model, dtype=self.dtype, param_dtype=self.param_dtype, name="shared",
                 embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed"))
                 )(input_ids)
    table = self.param("relative_attention_bias", nn.with_logical_partitioning(
        nn.initializers.normal(c.d_model ** -0.5), ("relpos_buckets", "heads")),
        (c.relative_attention_num_buckets, c.num_heads), self.param_dtype)
    buckets = relative_position_buckets(length, c.relative_attention_num_buckets,
                                        c.relative_attention_max_distance)
    bias = jnp.transpose(table.astype(jnp.float32)[buckets], (2, 0, 1))[None]  # (1, heads, L, L)
    for i in range(c.num_layers):
      block = T5Block(c, self.dtype, self.param_dtype, name=f"block_{i}")
      x = own_computation(block, x, mask, bias)
    return T5LayerNorm(c.layer_norm_epsilon, self.dtype, self.param_dtype, name="final_layer_norm")(x)
