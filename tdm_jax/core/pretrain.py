"""Teacher pretraining with the usual denoising objective and condition dropout for CFG.

TDM distils a teacher it is given; the shipped examples make their own teachers, with this:
`pretrain` for the seconds-long vector teacher, `fit` for anything that runs long enough to
need checkpoints (the shapes pipeline's VAE and denoiser).
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax
import tqdm

from tdm_jax.core import rng
from tdm_jax.core.schedules import Schedule
from tdm_jax.infra import distributed
from tdm_jax.infra.checkpoint import Checkpointer
from tdm_jax.infra.errors import NonFiniteLossError
from tdm_jax.infra.metrics import MetricsWriter

PyTree = Any


def drop_condition(key, cond, uncond, rate: float):
  """Replaces each sample's condition by the unconditional one with probability `rate`."""
  batch = jax.tree.leaves(cond)[0].shape[0]
  drop = jax.random.uniform(key, (batch,)) < rate
  pick = lambda c, u: jnp.where(drop.reshape((batch,) + (1,) * (c.ndim - 1)), u, c)
  return jax.tree.map(pick, cond, uncond)


def min_snr_weight(schedule: Schedule, t, gamma: float):
  """Min-SNR-gamma loss weights (Hang et al. 2023) for the schedule's prediction type, per sample.

  Equal to weighting the x0 error by min(SNR, gamma): timesteps past SNR gamma stop dominating the
  objective, the noisy ones (where layout and binding are decided) keep full weight; the paper
  reports ~3x faster convergence for ViT denoisers. eps: min(snr, g) / snr; v: min(snr, g) / (snr + 1);
  sample: min(snr, g); a flow's velocity (x0 = x_t - sigma v): min(snr, g) sigma^2."""
  return schedule.min_snr_weight(t, gamma)


def denoising_loss(params, apply: Callable, schedule: Schedule, x0, cond, uncond, key, cond_dropout: float,
                   min_snr_gamma: Optional[float] = None):
  """Mean squared error of the model output against its target (eps, v or x0) at t ~ U{0..N-1};
  with `min_snr_gamma` > 0, each sample's error weighted by `min_snr_weight` (None or <= 0: unweighted,
  as `TDMConfig.min_snr_gamma`). A flow teacher learns the velocity at sigma = shift(u) with u logit-normal
  (SD3's training draw, its "logit_normal" scheme: mean 0, std 1, on the teacher's shifted grid)."""
  t_key, n_key, d_key = jax.random.split(key, 3)
  t = schedule.training_timesteps(t_key, x0.shape[0])
  eps = jax.random.normal(n_key, x0.shape, x0.dtype)
  cond = drop_condition(d_key, cond, uncond, cond_dropout)
  out = apply(params, schedule.add_noise(x0, eps, t), t, cond)
  target = schedule.from_x0_eps(x0, eps, t)
  if min_snr_gamma is None or min_snr_gamma <= 0:
    return jnp.mean((out.astype(jnp.float32) - target)**2)
  per_sample = jnp.mean((out.astype(jnp.float32) - target)**2, axis=tuple(range(1, x0.ndim)))
  return jnp.mean(per_sample * min_snr_weight(schedule, t, min_snr_gamma))


def clipped_adam(learning_rate: float, num_iterations: int, warmup_steps: int) -> optax.GradientTransformation:
  """Adam with global-norm clipping at 1, linear warm-up, then cosine decay to a tenth."""
  warmup_steps = max(warmup_steps, 1)
  lr = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps, max(num_iterations, warmup_steps + 1),
                                          end_value=0.1 * learning_rate)
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(lr))


def pretrain(apply: Callable, params: PyTree, schedule: Schedule, data: Callable, *, num_iterations: int,
             batch_size: int, learning_rate: float, cond_dropout: float, seed: int, warmup_steps: int = 0,
             progress: bool = True) -> PyTree:
  """Trains `params` for `num_iterations` Adam steps; `data(key, batch_size) -> (x0, cond, uncond)`.

  Deterministic in (seed, iteration), like distillation. Meant for the small teachers of the
  examples, which train in seconds to minutes.
  """
  tx = clipped_adam(learning_rate, num_iterations, warmup_steps)

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
        raise NonFiniteLossError(f"teacher pretraining loss is {loss} at iteration {step}; lower the "
                                  f"learning rate")
      bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
  return params


def fit(step_fn: Callable, init_fn: Callable, batch_fn: Callable, *, num_iterations: int, workdir: str,
        checkpoint_every: int, keep_checkpoints: int = 2, log_every: int = 50, desc: str = "train",
        progress: bool = True, loss_key: str = "loss") -> PyTree:
  """Runs (or resumes) `state, scalars = step_fn(state, batch, step)` up to `num_iterations`.

  `init_fn()` makes the first state (also traced with `jax.eval_shape` to restore into);
  `batch_fn(step)` is the host batch of an iteration, a pure function of it, so a run killed and
  resumed from `workdir/checkpoints` repeats the uninterrupted one. Scalars go to
  `workdir/metrics.jsonl`. A non-finite `scalars[loss_key]` stops the run, naming the iteration
  and the last checkpoint, which stays intact.
  """
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=checkpoint_every,
                              keep=keep_checkpoints)
  writer = MetricsWriter(workdir, tensorboard=False)
  try:
    start, state = checkpointer.restore_latest(jax.eval_shape(init_fn))
    if state is None:
      start, state = 0, jax.jit(init_fn)()
    writer.truncate_after(start)
    bar = tqdm.tqdm(total=num_iterations, initial=start, desc=desc, unit="it", dynamic_ncols=True,
                    disable=not progress or not distributed.is_primary())
    for step in range(start, num_iterations):
      state, scalars = step_fn(state, batch_fn(step), jnp.int32(step))
      done = step + 1
      save = checkpointer.should_save(done) or done == num_iterations
      if done % log_every == 0 or save:  # checked before every save: no checkpoint holds a NaN run
        scalars = {k: float(v) for k, v in jax.device_get(scalars).items()}
        if not jnp.isfinite(scalars[loss_key]):
          last: Optional[int] = checkpointer.latest_step
          raise NonFiniteLossError(
              f"{desc}: {loss_key} is {scalars[loss_key]} at iteration {done}; the last checkpoint "
              f"({last if last is not None else 'none'}) in {checkpointer.directory} is intact: lower the "
              f"learning rate and run again to resume from it")
        writer.write(done, scalars)
        bar.set_postfix({k: f"{v:.4g}" for k, v in scalars.items()}, refresh=False)
      bar.update(1)
      if save:
        checkpointer.save(done, state)
    bar.close()
  finally:
    writer.close()
    checkpointer.close()
  return state
