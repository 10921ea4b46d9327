"""The optimisers of TDM.md, built from optax: AdamW (betas 0, 0.95), clipping, warm-up + cosine."""

from __future__ import annotations

import re

import jax
import optax

from tdm_jax.infra.errors import ConfigError

SCHEDULES = ("constant", "cosine")


def learning_rate_schedule(peak: float, kind: str, warmup_steps: int, total_steps: int,
                           final_fraction: float) -> optax.Schedule:
  """Linear warm-up to `peak`, then constant or cosine decay to `final_fraction * peak`."""
  if kind not in SCHEDULES:
    raise ConfigError(f"unknown learning-rate schedule {kind!r}; expected one of {SCHEDULES}")
  if kind == "constant":
    if warmup_steps <= 0:
      return optax.constant_schedule(peak)
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup_steps), optax.constant_schedule(peak)],
                                [warmup_steps])
  return optax.warmup_cosine_decay_schedule(0.0, peak, max(warmup_steps, 0), max(total_steps, warmup_steps + 1),
                                            end_value=final_fraction * peak)


def _path(keys) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in keys)


def lr_scales(scales) -> optax.GradientTransformation:
  """Multiplies the updates of leaves whose "/"-joined path matches a regex by its factor: a learning
  rate per parameter group, on top of the schedule. Adam's steps are ~lr whatever the gradient's
  size, so a zero-initialised table trained at the network's learning rate barely leaves zero in a
  short run; unified TDM's step-count embedding (`class_embedding`) is what this is for."""
  pairs = []
  for entry in scales:
    if len(entry) != 2:
      raise ConfigError(f"optim.lr_scales entry {entry!r} must be a pair (path regex, factor)")
    pattern, factor = entry
    try:
      pairs.append((re.compile(pattern), float(factor)))
    except re.error as e:
      raise ConfigError(f"optim.lr_scales: {pattern!r} is not a valid regex ({e})") from e
    if not float(factor) > 0:
      raise ConfigError(f"optim.lr_scales: factor {factor!r} for {pattern!r} must be positive")

  def factor_of(path) -> float:
    name = _path(path)
    return next((f for pattern, f in pairs if pattern.search(name)), 1.0)

  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(lambda p, u: u * factor_of(p) if factor_of(p) != 1.0 else u,
                                            updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def adamw(schedule: optax.Schedule, cfg, clip_norm: float) -> optax.GradientTransformation:
  """AdamW with optional global-norm clipping in front and `optim.lr_scales` behind."""
  opt = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
  parts = ([optax.clip_by_global_norm(clip_norm)] if clip_norm > 0 else []) + [opt]
  if tuple(cfg.get("lr_scales", ())):
    parts.append(lr_scales(cfg.lr_scales))
  return optax.chain(*parts) if len(parts) > 1 else opt


def make_optimizers(cfg, num_iterations: int):
  """(student_tx, fake_tx, student_schedule, fake_schedule) from `config.optim`; the cosine decays
  over `optim.decay_steps` iterations (0: the run's num_iterations; the authors' command: 10,001)."""
  if cfg.decay_steps < 0:
    raise ConfigError(f"optim.decay_steps={cfg.decay_steps} must be >= 0 (0: decay over train.num_iterations)")
  horizon = int(cfg.decay_steps) or num_iterations
  student_lr = learning_rate_schedule(cfg.student_lr, cfg.student_schedule, cfg.student_warmup_steps,
                                      horizon, cfg.final_lr_fraction)
  fake_lr = learning_rate_schedule(cfg.fake_lr, cfg.fake_schedule, cfg.fake_warmup_steps, horizon,
                                   cfg.final_lr_fraction)
  return (adamw(student_lr, cfg, cfg.student_grad_clip), adamw(fake_lr, cfg, cfg.fake_grad_clip),
          student_lr, fake_lr)
