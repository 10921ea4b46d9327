"""The distillation loop: state, one jitted TDM iteration, checkpoints, metrics, progress.

`distill(task, config, workdir)` is the whole of it. A `Task` is what TDM needs of any
teacher (its apply function, weights, schedule, sample shape and conditioning batches), so
the same loop serves the vector example, the shapes pipeline and SDXL.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Optional

import jax
import numpy as np
import tqdm
from absl import logging

from tdm_jax import rng, sharding, tdm
from tdm_jax.checkpoint import Checkpointer
from tdm_jax.metrics import MetricsWriter
from tdm_jax.optim import make_optimizers
from tdm_jax.schedules import Schedule

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Task:
  """What TDM needs of a teacher.

  apply: `apply(params, x_t, t, cond, **extra) -> model output` (the schedule's parameterisation).
  batch: `batch(step, batch_size) -> (cond, uncond)`, host pytrees with a leading batch axis; a
    pure function of the step so that a resumed run sees the same batches.
  student_apply / fake_apply: only when they differ from the teacher's (e.g. step-conditioned).
  """
  apply: Callable
  teacher_params: PyTree
  schedule: Schedule
  sample_shape: tuple
  batch: Callable[[int, int], tuple]
  student_apply: Optional[Callable] = None
  fake_apply: Optional[Callable] = None
  student_init: Optional[PyTree] = None  # default: the teacher's parameters
  fake_init: Optional[PyTree] = None

  @property
  def networks(self) -> tdm.Networks:
    return tdm.Networks(self.apply, self.student_apply, self.fake_apply).resolved()


class NonFiniteLossError(FloatingPointError):
  """A loss became NaN or Inf; the last good checkpoint stays on disk."""


def _host_scalars(metrics) -> dict:
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


def _check_finite(step: int, scalars: dict, checkpointer: Checkpointer) -> None:
  bad = {k: v for k, v in scalars.items() if not np.isfinite(v)}
  if not bad:
    return
  last = checkpointer.latest_step
  where = (f"the last good checkpoint is step {last} at {checkpointer.path(last)}" if last is not None
           else "no checkpoint was written yet")
  raise NonFiniteLossError(
      f"non-finite values at iteration {step}: {bad}; training stopped and {where}. Lower the "
      f"learning rates (optim.*_lr), check the teacher's outputs, or enable gradient clipping")


def make_train_step(task: Task, config, student_tx, fake_tx, student_lr, fake_lr):
  """The pure function that one jit compiles: state, teacher, batch -> state, metrics."""
  cfg = tdm.TDMConfig.from_config(config.tdm)
  iterate = functools.partial(tdm.tdm_iteration, nets=task.networks, schedule=task.schedule, cfg=cfg,
                              student_tx=student_tx, fake_tx=fake_tx, sample_shape=tuple(task.sample_shape),
                              ema_decay=float(config.train.ema_decay))

  def train_step(state, teacher_params, cond, uncond):
    key = rng.iteration_key(config.seed, state.step)
    new_state, metrics = iterate(state, teacher_params, cond, uncond, key)
    metrics["student_lr"] = student_lr(state.step)
    metrics["fake_lr"] = fake_lr(state.step)
    return new_state, metrics

  return train_step


def init_state(task: Task, student_tx, fake_tx, use_ema: bool) -> tdm.TDMState:
  student = task.student_init if task.student_init is not None else task.teacher_params
  fake = task.fake_init if task.fake_init is not None else task.teacher_params
  return tdm.init_state(student, fake, student_tx, fake_tx, use_ema=use_ema)


def distill(task: Task, config, workdir: str, *, progress: Optional[bool] = None) -> tdm.TDMState:
  """Runs (or resumes) TDM distillation of `task` to `config.train.num_iterations`.

  Checkpoints go to `workdir/checkpoints` every `train.checkpoint_every` iterations and at the
  end; metrics to `workdir/metrics.jsonl` and `workdir/tensorboard`. Returns the final state.
  """
  tc = config.train
  tdm.TDMConfig.from_config(config.tdm)  # validate before any work
  mesh = sharding.make_mesh(config.mesh.shape)
  multiple = sharding.batch_size_multiple(mesh)
  if tc.batch_size % multiple:
    raise ValueError(f"train.batch_size={tc.batch_size} must be a multiple of the {multiple} batch shards "
                     f"of mesh.shape={tuple(config.mesh.shape)}")
  student_tx, fake_tx, student_lr, fake_lr = make_optimizers(config.optim, tc.num_iterations)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  use_ema = tc.ema_decay > 0
  replicated = sharding.replicated(mesh)
  batch_sharding = sharding.batch_sharding(mesh)
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=tc.checkpoint_every,
                              keep=tc.keep_checkpoints)
  writer = MetricsWriter(workdir, tensorboard=tc.tensorboard)
  with jax.set_mesh(mesh):
    teacher_params = sharding.replicate(task.teacher_params, mesh)
    init = functools.partial(init_state, task, student_tx, fake_tx, use_ema)
    abstract = jax.eval_shape(init)
    state_sharding = jax.tree.map(lambda _: replicated, abstract)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                            state_sharding)
    start, restored = checkpointer.restore_latest(abstract)
    if restored is None:
      state = jax.jit(init, out_shardings=state_sharding)()
      start = 0
    else:
      state = restored
      logging.info("resuming from iteration %d", start)
    writer.truncate_after(start)

    step_fn = jax.jit(make_train_step(task, config, student_tx, fake_tx, student_lr, fake_lr),
                      in_shardings=(state_sharding, replicated, batch_sharding, batch_sharding),
                      out_shardings=(state_sharding, replicated), donate_argnums=(0,))
    show = tc.progress if progress is None else progress
    bar = tqdm.tqdm(total=tc.num_iterations, initial=start, desc="tdm", unit="it", dynamic_ncols=True,
                    disable=not show or jax.process_index() != 0)
    try:
      for step in range(start, tc.num_iterations):
        cond, uncond = task.batch(step, tc.batch_size)
        state, metrics = step_fn(state, teacher_params, sharding.shard_batch(cond, mesh),
                                 sharding.shard_batch(uncond, mesh))
        scalars = _host_scalars(metrics)
        _check_finite(step + 1, scalars, checkpointer)
        done = step + 1
        if done % tc.log_every == 0 or done == tc.num_iterations:
          writer.write(done, scalars)
        bar.set_postfix(fake=f"{scalars['fake_loss']:.4g}", gen=f"{scalars['generator_loss']:.4g}", refresh=False)
        bar.update(1)
        if checkpointer.should_save(done) or done == tc.num_iterations:
          checkpointer.save(done, state)
    finally:
      bar.close()
      writer.close()
      checkpointer.close()
  return state


def restore_state(task: Task, config, workdir: str, step: Optional[int] = None) -> tdm.TDMState:
  """The saved TDM state of a run (its latest checkpoint unless `step` is given), on the host."""
  student_tx, fake_tx, _, _ = make_optimizers(config.optim, config.train.num_iterations)
  abstract = jax.eval_shape(functools.partial(init_state, task, student_tx, fake_tx, config.train.ema_decay > 0))
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    step = checkpointer.latest_step if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {checkpointer.directory}; run --mode=train with this "
                              f"--workdir first")
    return checkpointer.restore(step, abstract)
  finally:
    checkpointer.close()


def student_params(state: tdm.TDMState):
  """The parameters to sample with: the EMA when the run keeps one."""
  return state.ema_params if state.ema_params is not None else state.student_params
