"""The benchmark rows of issue 11 as run configs, and our step on one of them (`Ours`), shared by
iteration.py, sampling.py, compile_cache.py and tests/test_torch_iteration.py (no absl flags here, so
tests can import it beside tdm_jax.main)."""

import gc

import jax
import numpy as np

from tdm_jax.core import rng, tdm, train
from tdm_jax.infra import sharding
from tdm_jax.tasks.diffusers import task as diffusers_task

SIZES = ("shapes", "sdxl256", "sdxl1024")


def row_config(size: str, batch_size: int = 0):
  """configs/shapes.py (batch 32), or configs/sdxl.py shape-only (random weights from the published
  configs) at 256 / 1024 px, batch 1, on one device."""
  if size not in SIZES:
    raise ValueError(f"size {size!r}; expected one of {SIZES}")
  if size == "shapes":
    from configs import shapes  # pylint: disable=g-import-not-at-top
    config = shapes.get_config()
  else:
    from configs import sdxl  # pylint: disable=g-import-not-at-top
    config = sdxl.get_config()
    config.model.resolution = 256 if size == "sdxl256" else 1024
    config.train.batch_size = 1
    config.mesh.shape = (1, 1, 1)
  if batch_size:
    config.train.batch_size = batch_size
  config.train.progress = False
  return config


def abstract_step_args(task, config, mesh):
  """(plan, frozen teacher, conditioner, step-0 inputs) of a task built with materialize=False,
  placed as a run places them: what lowering the step or its parts needs. Call under jax.set_mesh."""
  p = train.plan(task, config, mesh)
  b = config.train.batch_size
  rows = sharding.process_rows(mesh, b)
  inputs = sharding.global_batch(task.inputs(0, b, rows), mesh, b, rows)
  return (p, sharding.with_shardings(task.teacher_params, p.teacher),
          sharding.with_shardings(task.conditioner, p.conditioner), inputs)


class Ours:
  """Our compiled TDM step on one device, run iteration by iteration from a fresh state."""

  def __init__(self, config, workdir: str, devices=None):
    devices = devices or jax.devices()[:1]
    self.config = config
    self.task = diffusers_task.build_task(config, workdir, devices=devices)
    self.mesh = sharding.make_mesh((len(devices), 1, 1), devices)
    with jax.set_mesh(self.mesh):
      self.plan = train.plan(self.task, config, self.mesh)
      self.teacher = jax.device_put(self.task.teacher_params, self.plan.teacher)
      self.conditioner = jax.device_put(self.task.conditioner, self.plan.conditioner)
      self.state = train.initial_state(self.task, config, self.plan, self.teacher)
      self.compiled, self.compile_times = train.compile_step(train.make_train_step(self.task, config), self.plan,
                                                             self.state, self.teacher, self.conditioner,
                                                             self.inputs(0))
    self.cfg = tdm.TDMConfig.from_config(config.tdm)
    self.step = 0

  def inputs(self, step: int):
    return self.task.batch(step, self.config.train.batch_size)

  def device_inputs(self, step: int):
    b = self.config.train.batch_size
    return sharding.global_batch(self.inputs(step), self.mesh, b, np.arange(b))

  def num_steps(self, step: int) -> int:
    if not self.cfg.step_choices:
      return self.cfg.num_student_steps
    return int(tdm.draw_step_count(self.cfg, rng.iteration_key(self.config.seed, step)))

  def release(self) -> None:
    """Frees our state, executables and frozen weights (the SDXL rows run theirs after ours, in one process)."""
    import ctypes  # pylint: disable=g-import-not-at-top
    import dataclasses  # pylint: disable=g-import-not-at-top
    del self.state, self.compiled, self.teacher, self.conditioner
    self.task = dataclasses.replace(self.task, teacher_params=None, conditioner=None)
    gc.collect()
    jax.clear_caches()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand the freed heap back before torch allocates its copy

  def run(self, step: int):
    """One iteration at `step` (the state carries on from whatever ran before); returns host metrics."""
    with jax.set_mesh(self.mesh):
      self.state, metrics = self.compiled(self.state, self.teacher, self.conditioner, self.device_inputs(step))
      return {k: float(v) for k, v in jax.device_get(metrics).items()}
