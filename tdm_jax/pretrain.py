"""Teacher pretraining with the usual denoising objective and condition dropout for CFG.

TDM distils a teacher it is given; the shipped examples make their own teachers, with this.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
import tqdm

from tdm_jax import rng
from tdm_jax.schedules import Schedule

PyTree = Any


def drop_condition(key, cond, uncond, rate: float):
  """Replaces each sample's condition by the unconditional one with probability `rate`."""
  batch = jax.tree.leaves(cond)[0].shape[0]
  drop = jax.random.uniform(key, (batch,)) < rate
  pick = lambda c, u: jnp.where(drop.reshape((batch,) + (1,) * (c.ndim - 1)), u, c)
  return jax.tree.map(pick, cond, uncond)


def denoising_loss(params, apply: Callable, schedule: Schedule, x0, cond, uncond, key, cond_dropout: float):
  """Mean squared error of the model output against its target (eps, v or x0) at t ~ U{0..N-1}."""
  t_key, n_key, d_key = jax.random.split(key, 3)
  t = jax.random.randint(t_key, (x0.shape[0],), 0, schedule.num_train_timesteps)
  eps = jax.random.normal(n_key, x0.shape, x0.dtype)
  cond = drop_condition(d_key, cond, uncond, cond_dropout)
  out = apply(params, schedule.add_noise(x0, eps, t), t, cond)
  target = schedule.from_x0_eps(x0, eps, t)
  return jnp.mean((out.astype(jnp.float32) - target)**2)


def pretrain(apply: Callable, params: PyTree, schedule: Schedule, data: Callable, *, num_iterations: int,
             batch_size: int, learning_rate: float, cond_dropout: float, seed: int, warmup_steps: int = 0,
             progress: bool = True) -> PyTree:
  """Trains `params` for `num_iterations` Adam steps; `data(key, batch_size) -> (x0, cond, uncond)`.

  Deterministic in (seed, iteration), like distillation. Meant for the small teachers of the
  examples, which train in seconds to minutes.
  """
  warmup_steps = max(warmup_steps, 1)
  lr = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps, max(num_iterations, warmup_steps + 1),
                                          end_value=0.1 * learning_rate)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(lr))

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step_fn(params, opt_state, step):
    key = rng.iteration_key(seed, step)
    x0, cond, uncond = data(rng.role_key(key, rng.Role.DATA), batch_size)
    loss, grads = jax.value_and_grad(denoising_loss)(params, apply, schedule, x0, cond, uncond,
                                                     rng.role_key(key, rng.Role.DIFFUSION_NOISE), cond_dropout)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = tx.init(params)
  bar = tqdm.trange(num_iterations, desc="teacher", unit="it", disable=not progress, dynamic_ncols=True)
  for step in bar:
    params, opt_state, loss = step_fn(params, opt_state, jnp.int32(step))
    if step % 100 == 0 or step == num_iterations - 1:
      loss = float(loss)
      if not jnp.isfinite(loss):
        raise FloatingPointError(f"teacher pretraining loss is {loss} at iteration {step}; lower the "
                                 f"learning rate")
      bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
  return params
