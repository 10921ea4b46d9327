"""Block-level rematerialisation that every XLA backend keeps.

`rematerialised(module, *args)` calls a Flax module so that the backward pass recomputes the
module's activations from its inputs instead of keeping them from the forward pass: a UNet
training step then holds each block's inputs, not every intermediate of every block.

On GPU and TPU this is `nn.remat` (`jax.checkpoint`). XLA:CPU undoes an unrolled
`jax.checkpoint`: the recomputation is merged back into the forward pass, and the program keeps
as much memory as with no remat at all (`benchmarks/cpu_remat_check.py` measures it). So on CPU
the module gets a custom VJP whose backward runs `jax.vjp` of a checkpointed call inside a
`lax.cond` branch entered with the incoming cotangent. A branch is a computation of its own: its
recomputation cannot start before the cotangent exists, nor be merged with the forward pass. The
forward runs in a branch of its own too, so XLA:CPU's float32 copies of bf16 weights (it has no
bf16 matmul) exist only while their block runs, not for the whole step. The branches also keep
each of XLA:CPU's O(n^2)-ordered computations small, which is what makes the SDXL step compile in
minutes there. The predicate (the first element of the inputs, or of the cotangent, is not NaN) is
true in every finite run; a NaN there gives NaN outputs or gradients, as it would anyway.

Gradients flow to every variable collection of the module ("params" for full copies, "lora"
for adapters, see `tdm_jax.core.lora.adapters_applied`); those nobody asks for are pruned by XLA.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

_GRAD_COLLECTIONS = ("params", "lora")


def _call(module, *args):
  return module(*args)


def _nan_like(shapes):
  return jax.tree_util.tree_map(lambda s: jnp.full(s.shape, jnp.nan, s.dtype), shapes)


def _not_nan(tree):
  first = jax.tree_util.tree_leaves(tree)[0]
  return ~jnp.isnan(first.reshape(-1)[0])


def _own_call(module, *args):
  """`module(*args)` in a computation of its own (a lifted `lax.cond` branch).

  XLA:CPU computes bf16 matmuls and convolutions on float32 copies of their weights and converts a
  whole program's weights up front; inside a branch the copies exist only while the block runs.
  """
  if module.is_initializing():
    return module(*args)
  shapes = jax.eval_shape(module.clone(parent=None).apply, module.variables, *args)
  return nn.cond(_not_nan(args), _call, lambda module, *args: _nan_like(shapes), module, *args)


def _forward(module, *args):
  # The vjp's own forward result is unused: remat leaves its residuals as the inputs, so XLA drops
  # that forward and keeps the branch's.
  _, vjp_fn = nn.vjp(nn.remat(_call), module, *args, vjp_variables=_GRAD_COLLECTIONS)
  return _own_call(module, *args), vjp_fn


def _backward(vjp_fn, cotangent):
  run = lambda vjp_fn, cotangent: vjp_fn(cotangent)
  shapes = jax.eval_shape(run, vjp_fn, cotangent)
  return jax.lax.cond(_not_nan(cotangent), run, lambda *_: _nan_like(shapes), vjp_fn, cotangent)


_cpu_rematerialised = nn.custom_vjp(_own_call, _forward, _backward, grad_vars=_GRAD_COLLECTIONS)


def own_computation(module: nn.Module, *args):
  """`module(*args)` for frozen, undifferentiated layers (the text encoders' transformer layers).

  On CPU the call runs in a branch of its own, so XLA:CPU's float32 copies of the layer's bf16
  weights exist only while it runs: without it the SDXL step converted all of text encoder 2's
  weights up front and held 2.6 GiB of copies at its peak (`benchmarks/peak_breakdown.py`).
  Elsewhere a plain call.
  """
  if jax.default_backend() == "cpu":
    return _own_call(module, *args)
  return module(*args)


def rematerialised(module: nn.Module, *args):
  """`module(*args)`, its activations recomputed in the backward pass (see the module docstring)."""
  if jax.default_backend() == "cpu":
    return _cpu_rematerialised(module, *args)
  return nn.remat(_call)(module, *args)
