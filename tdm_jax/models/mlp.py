"""Small class-conditional MLP denoiser for vector data.

Used by the toy "distill your own denoiser" example so the TDM pipeline can be
exercised end to end on CPU before image models exist.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

# Parameters carry logical axis names so sharding rules elsewhere can map them
# onto a mesh without touching this module. The residual stream and the
# conditioning embedding live in "embed"; hidden expansions live in "mlp".
_KERNEL_IN = ("embed", "mlp")
_KERNEL_OUT = ("mlp", "embed")


def _dense(features: int, axes, name: str, dtype, kernel_init=None) -> nn.Dense:
    kernel_init = kernel_init or nn.initializers.lecun_normal()
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(kernel_init, axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[-1],)),
        name=name,
    )


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding, cos-first (Diffusers flip_sin_to_cos=True, shift 0).

    Matching Diffusers' layout keeps the toy consistent with the image models.
    """
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half
    args = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class ResidualBlock(nn.Module):
    """LayerNorm -> scale/shift from embedding -> SiLU -> Dense, with a skip."""

    width: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, emb):
        ss = _dense(2 * self.width, _KERNEL_IN, "emb_proj", self.dtype)(nn.silu(emb))
        scale, shift = jnp.split(ss, 2, axis=-1)
        y = nn.LayerNorm(
            dtype=self.dtype,
            param_dtype=jnp.float32,
            scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
            name="norm",
        )(h)
        y = y * (1.0 + scale) + shift
        y = _dense(self.width, _KERNEL_IN, "fc1", self.dtype)(nn.silu(y))
        y = _dense(self.width, _KERNEL_OUT, "fc2", self.dtype)(nn.silu(y))
        return h + y


class MLPDenoiser(nn.Module):
    """Class-conditional denoiser for vectors x of shape (B, dim).

    Label `num_classes` is the null label used for classifier-free guidance.
    With `max_num_steps > 0` the student can be told its sampling step count;
    that embedding is zero-initialised so a student initialised from the
    teacher starts out computing exactly the teacher's function. num_steps None
    (the teacher) adds nothing, so pretraining leaves the table at zero; counts
    are clipped to [0, max_num_steps].
    """

    dim: int
    num_classes: int
    width: int = 256
    depth: int = 4
    time_embed_dim: int = 64
    max_num_steps: int = 0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_t, t, cond, num_steps: Optional[jax.Array] = None):
        if num_steps is not None and self.max_num_steps <= 0:
            raise ValueError(
                "MLPDenoiser got num_steps but was built with max_num_steps=0; "
                "set max_num_steps > 0 to enable step-count conditioning."
            )
        batch = x_t.shape[0]
        t = jnp.broadcast_to(jnp.asarray(t), (batch,))

        emb = timestep_embedding(t, self.time_embed_dim).astype(self.dtype)
        emb = _dense(self.width, _KERNEL_IN, "time_fc1", self.dtype)(emb)
        emb = _dense(self.width, _KERNEL_OUT, "time_fc2", self.dtype)(nn.silu(emb))

        label_embed = nn.Embed(
            self.num_classes + 1,
            self.width,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(stddev=1.0), ("vocab", "embed")
            ),
            name="label_embed",
        )
        emb = emb + label_embed(jnp.asarray(cond["label"], jnp.int32))

        if self.max_num_steps > 0:
            # Always create the table so the param tree does not depend on the call.
            steps_embed = nn.Embed(
                self.max_num_steps + 1,
                self.width,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                embedding_init=nn.with_logical_partitioning(
                    nn.initializers.zeros, ("vocab", "embed")
                ),
                name="num_steps_embed",
            )
            if num_steps is not None:
                ns = jnp.clip(jnp.broadcast_to(jnp.asarray(num_steps, jnp.int32), (batch,)),
                              0, self.max_num_steps)
                emb = emb + steps_embed(ns)
            else:
                # Unspecified (the teacher): no row at all, so teacher training never moves
                # the table and every row stays zero until the student trains it.
                steps_embed(jnp.zeros((batch,), jnp.int32))

        h = _dense(self.width, _KERNEL_OUT, "in_proj", self.dtype)(x_t.astype(self.dtype))
        for i in range(self.depth):
            h = ResidualBlock(self.width, dtype=self.dtype, name=f"block_{i}")(h, emb)
        h = nn.LayerNorm(
            dtype=self.dtype,
            param_dtype=jnp.float32,
            scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
            name="out_norm",
        )(h)
        out = _dense(self.dim, _KERNEL_IN, "out_proj", self.dtype)(nn.silu(h))
        return out.astype(jnp.float32)


def init_params(model: MLPDenoiser, key: jax.Array, batch_size: int = 1):
    """Initialise and unbox parameters (metadata is recoverable via model.init).

    Jitted because compiling init once is much cheaper on CPU than dispatching
    (and compiling) every initialiser op eagerly.
    """
    x = jnp.zeros((batch_size, model.dim), jnp.float32)
    t = jnp.zeros((batch_size,), jnp.int32)
    cond = {"label": jnp.zeros((batch_size,), jnp.int32)}
    num_steps = jnp.ones((batch_size,), jnp.int32) if model.max_num_steps > 0 else None
    variables = jax.jit(model.init)(key, x, t, cond, num_steps)
    return nn.unbox(variables["params"])
