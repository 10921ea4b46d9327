"""The distillation loop: state, one jitted TDM iteration, checkpoints, metrics, progress.

`distill(task, config, workdir)` is the whole of it. A `Task` is what TDM needs of any
teacher (its apply function, weights, schedule, sample shape and conditioning batches), so
the same loop serves the vector example, the shapes pipeline and SDXL.

Every tree is placed on the mesh by its logical axis names and `mesh.rules`
(`tdm_jax/infra/sharding.py`): the frozen teacher (also the LoRA base) and the frozen conditioner
(text encoders) are arguments of the compiled step, never constants baked into it, and
the state (student, fake score, their optimiser states) is donated to it. One function,
`plan`, computes every sharding, so init, restore and the step never disagree.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import glob
import numbers
import os
import time
from typing import Any, Callable, NamedTuple, Optional

import jax
import numpy as np
import optax
import tqdm
from absl import logging

from tdm_jax.core import lora, rng, tdm
from tdm_jax.core.optim import make_optimizers
from tdm_jax.core.schedules import Schedule
from tdm_jax.infra import distributed, sharding
from tdm_jax.infra.checkpoint import Checkpointer, CheckpointError
from tdm_jax.infra.errors import ConfigError, MissingFileError, NonFiniteLossError
from tdm_jax.infra.metrics import MetricsWriter

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Task:
  """What TDM needs of a teacher.

  apply: `apply(params, x_t, t, cond, **extra) -> model output` (the schedule's parameterisation).
  batch: `batch(step, batch_size) -> inputs`, host pytrees with a leading batch axis; a pure
    function of the step so that a resumed run sees the same batches. Without `condition`,
    inputs is the pair (cond, uncond) itself.
  local_batch: `local_batch(step, batch_size, rows) -> inputs` of only the global rows `rows`
    (this process's share); when absent, `batch` is computed whole and sliced.
  condition: `condition(conditioner, inputs) -> (cond, uncond)`, run on device inside the
    compiled step (e.g. token ids -> text-encoder states); `conditioner` is its frozen weights.
  student_apply / fake_apply: only when they differ from the teacher's (e.g. step-conditioned).
  student_init / fake_init: `init(teacher_params, key) -> params`; default: copies of the teacher.
  lora: when set, student and fake score are LoRA adapters over `teacher_params` (the one frozen
    base); `lora_apply(base, adapters, x_t, t, cond, **extra)` runs the adapted model (default:
    `apply(lora.merge(base, adapters))`).
  param_axes / conditioner_axes: trees of logical axis names (tuples) of the teacher's and the
    conditioner's parameters, for the sharding rules; None leaves only the fsdp size guard.
  trainable_axes: those of full-copy student and fake score when their tree is not the teacher's
    (e.g. a unified student's extra step table); with LoRA, those of the base plus any parameter
    the adapter tree trains in full that the base lacks.
  source: the data's position when it is more than the step (a dataset read in order):
    `state(step, num_rows) -> dict` is saved with the checkpoint of `step` (JSON), and
    `restore(step, saved)` continues from it on resume (`tdm_jax/infra/data.py`).
  run: what the task's module built the task from, handed back to its export and evaluation so they
    never rebuild it (a Diffusers task's `build.Run`); the training loop never reads it.
  """
  apply: Callable
  teacher_params: PyTree
  schedule: Schedule
  sample_shape: tuple
  batch: Callable[[int, int], Any]
  student_apply: Optional[Callable] = None
  fake_apply: Optional[Callable] = None
  student_init: Optional[Callable] = None
  fake_init: Optional[Callable] = None
  lora: Optional[lora.LoraConfig] = None
  lora_apply: Optional[Callable] = None
  param_axes: Optional[PyTree] = None
  trainable_axes: Optional[PyTree] = None
  conditioner: Optional[PyTree] = None
  conditioner_axes: Optional[PyTree] = None
  condition: Optional[Callable] = None
  local_batch: Optional[Callable] = None
  source: Optional[Any] = None
  run: Optional[Any] = None

  @property
  def networks(self) -> tdm.Networks:
    return tdm.Networks(self.apply, self.student_apply, self.fake_apply).resolved()

  def networks_over(self, teacher_params) -> tdm.Networks:
    """The three applies, with LoRA's student and fake score bound to the (traced) base."""
    if self.lora is None:
      return self.networks
    run = self.lora_apply or (lambda base, adapters, *args, **kw: self.apply(lora.merge(base, adapters, self.lora),
                                                                             *args, **kw))
    adapted = lambda adapters, *args, **kw: run(teacher_params, adapters, *args, **kw)
    return tdm.Networks(self.apply, adapted, adapted)

  def conditioning(self, conditioner, inputs):
    return self.condition(conditioner, inputs) if self.condition is not None else inputs

  def inputs(self, step: int, batch_size: int, rows: np.ndarray):
    """The host inputs of `rows` of iteration `step`'s global batch."""
    if self.local_batch is not None:
      return self.local_batch(step, batch_size, rows)
    return jax.tree.map(lambda x: np.asarray(x)[rows], self.batch(step, batch_size))


def _host_scalars(metrics) -> dict:
  """The step's metrics on the host: a sync with the device, so the loop calls it only at log and
  checkpoint steps and at the last step."""
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


def _check_finite(step: int, scalars: dict, checkpointer: Checkpointer, every: Optional[int] = None) -> None:
  bad = {k: v for k, v in scalars.items() if not np.isfinite(v)}
  if not bad:
    return
  checkpointer.wait()  # an asynchronous save in flight is the last good checkpoint once it completes
  last = checkpointer.latest_step
  where = (f"the last good checkpoint is step {last} at {checkpointer.path(last)}" if last is not None
           else "no checkpoint was written yet")
  seen = (f" (metrics are checked every train.log_every={every} iterations and before each checkpoint, "
          f"so it may have begun earlier)" if every and every > 1 else "")
  raise NonFiniteLossError(
      f"non-finite values at iteration {step}: {bad}{seen}; training stopped and {where}. Lower the "
      f"learning rates (optim.*_lr), check the teacher's outputs, or enable gradient clipping")


def use_compilation_cache(path: str) -> Optional[str]:
  """Turns on JAX's persistent compilation cache in `path` (config.compilation_cache; "" leaves it off).

  Must run before anything compiles: JAX reads the setting once, at the first compilation. Every
  program is cached, however small or fast to compile (the thresholds are 0), so a later process
  with the same programs, devices and JAX version loads them instead of compiling. Returns the
  directory (None when off)."""
  if not path:
    return None
  if not isinstance(path, str):
    raise ConfigError(f"compilation_cache={path!r} must be a folder path (or \"\" for no cache)")
  if "://" not in path:  # a local folder; JAX also takes gs:// and other epath URLs as they are
    path = os.path.abspath(os.path.expanduser(path))
    try:
      os.makedirs(path, exist_ok=True)
    except OSError as err:
      raise ConfigError(f"compilation_cache={path} cannot be created ({type(err).__name__}: {err}); "
                        f"give a writable folder or \"\" for no cache") from err
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  logging.info("persistent compilation cache in %s", path)
  return path


def profile_window(tc) -> Optional[tuple[int, int]]:
  """(first, count) of `train.profile_steps`, validated; None when empty (no trace)."""
  value = tuple(tc.profile_steps)
  if not value:
    return None
  integers = all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value)
  if len(value) != 2 or not integers or value[0] < 0 or value[1] < 1:
    raise ConfigError(f"train.profile_steps={value!r} must be (first_step, count) with first_step >= 0 and "
                      f"count >= 1, e.g. --config.train.profile_steps=(10,5); () for no trace")
  first, count = int(value[0]), int(value[1])
  if first >= tc.num_iterations:
    raise ConfigError(f"train.profile_steps={value!r} starts at iteration {first}, at or past "
                      f"train.num_iterations={tc.num_iterations}; choose a first_step below it")
  return first, count


class _Profiler:
  """A profiler window over iterations [first, first + count) (the state's step before each), traced on
  the primary process into `directory` (TensorBoard's profile plugin and Perfetto read it)."""

  def __init__(self, window: Optional[tuple[int, int]], directory: str):
    self.window, self.directory, self.active = window, directory, False
    self.enabled = window is not None and distributed.is_primary()

  def before(self, step: int) -> None:
    if self.enabled and not self.active and self.window[0] <= step < sum(self.window):
      options = jax.profiler.ProfileOptions()
      # No Python tracer: it sets a profile function on every Python thread, and one of our runs with
      # it on died in _PyEval_SetProfile (a segfault) while checkpoint threads came and went. The
      # host (TraceMe) and device traces remain.
      options.python_tracer_level = 0
      jax.profiler.start_trace(self.directory, create_perfetto_trace=True, profiler_options=options)
      self.active, self.began = True, step
      self.enabled = False  # one window per run

  def after(self, done: int, state) -> None:
    if self.active and done >= sum(self.window):
      self.stop(state, done)

  def stop(self, state=None, done: Optional[int] = None) -> None:
    if not self.active:
      return
    self.active = False
    if state is not None:
      jax.block_until_ready(state)  # the trace holds the device work of the last iteration too
    jax.profiler.stop_trace()
    runs = sorted(glob.glob(os.path.join(self.directory, "plugins", "profile", "*")), key=os.path.getmtime)
    where = runs[-1] if runs else self.directory
    span = f"iterations {self.began}..{done - 1}" if done is not None else f"iterations from {self.began}"
    logging.info("profile of %s written to %s (tensorboard --logdir=%s, or its perfetto_trace.json.gz "
                    "in ui.perfetto.dev)", span, where, self.directory)


def make_train_step(task: Task, config):
  """The pure function that one jit compiles: (state, teacher, conditioner, inputs) -> (state, metrics)."""
  student_tx, fake_tx, student_lr, fake_lr = make_optimizers(config.optim, config.train.num_iterations)
  cfg = tdm.TDMConfig.from_config(config.tdm)
  iterate = functools.partial(tdm.tdm_iteration, schedule=task.schedule, cfg=cfg, student_tx=student_tx,
                              fake_tx=fake_tx, sample_shape=tuple(task.sample_shape),
                              ema_decay=float(config.train.ema_decay))

  def train_step(state, teacher_params, conditioner, inputs):
    key = rng.iteration_key(config.seed, state.step)
    cond, uncond = task.conditioning(conditioner, inputs)
    new_state, metrics = iterate(state, teacher_params, cond, uncond, key, nets=task.networks_over(teacher_params))
    metrics["student_lr"] = student_lr(state.step)
    metrics["fake_lr"] = fake_lr(state.step)
    return new_state, metrics

  return train_step


def init_networks(task: Task, teacher_params, key):
  """(student, fake score) from the teacher: copies, or zero-effect LoRA adapters."""
  student_key, fake_key = jax.random.split(key)
  if task.lora is not None:
    default = lambda teacher, k: lora.init_adapters(k, teacher, task.lora)
  else:
    default = lambda teacher, k: teacher
  student = (task.student_init or default)(teacher_params, student_key)
  return student, (task.fake_init or default)(teacher_params, fake_key)


def init_state(task: Task, student_tx, fake_tx, use_ema: bool, teacher_params, key) -> tdm.TDMState:
  """Student and fake score from the teacher (copies, or zero-effect LoRA adapters), fresh optimisers."""
  student, fake = init_networks(task, teacher_params, key)
  return tdm.init_state(student, fake, student_tx, fake_tx, use_ema=use_ema)


def state_programs(task: Task, config, p: "Plan"):
  """The fresh state as two jitted programs, each writing straight into its shards:
  `networks(teacher, key) -> (student, fake)`, then `optimizers(student, fake) -> TDMState`, which
  takes the networks donated. Equal to one jit of `state_init`; split so that the random draws'
  temporaries (3x the adapters at SDXL size) and the optimiser moments never coexist, which sets
  the process's peak memory when the frozen weights are already resident."""
  student_tx, fake_tx, _, _ = make_optimizers(config.optim, config.train.num_iterations)
  networks = jax.jit(functools.partial(init_networks, task),
                     out_shardings=(p.state.student_params, p.state.fake_params))
  optimizers = jax.jit(functools.partial(tdm.init_state, student_tx=student_tx, fake_tx=fake_tx,
                                         use_ema=config.train.ema_decay > 0),
                       out_shardings=p.state, donate_argnums=(0, 1))
  return networks, optimizers


def state_init(task: Task, config) -> Callable:
  """`init(teacher_params, key) -> TDMState` of a run's config (its optimisers and EMA setting)."""
  student_tx, fake_tx, _, _ = make_optimizers(config.optim, config.train.num_iterations)
  return functools.partial(init_state, task, student_tx, fake_tx, config.train.ema_decay > 0)


class Plan(NamedTuple):
  """Where everything of a run lives on the mesh."""
  mesh: Any
  teacher: PyTree  # shardings of the frozen teacher / LoRA base
  conditioner: PyTree
  state: PyTree  # shardings of the TDMState
  abstract_state: PyTree  # ShapeDtypeStructs carrying `state`
  batch: Any


def _trainable_axes(task: Task, abstract_trainable):
  if task.param_axes is None:
    return None
  if task.lora is not None:  # trainable_axes, when given, also names the parameters trained in full
    return lora.adapter_axes(task.trainable_axes or task.param_axes, abstract_trainable)
  for axes in (task.trainable_axes, task.param_axes):
    if axes is not None and _same_structure(abstract_trainable, axes):
      return axes
  return None


def _same_structure(tree, axes) -> bool:
  is_axes = lambda x: isinstance(x, tuple) or x is None
  return jax.tree.structure(tree) == jax.tree.structure(jax.tree.map(lambda _: 0, axes, is_leaf=is_axes))


def plan(task: Task, config, mesh) -> Plan:
  """Shardings of teacher, conditioner and state from logical names and `mesh.rules` (no data moved)."""
  student_tx, fake_tx, _, _ = make_optimizers(config.optim, config.train.num_iterations)
  rules = sharding.rules_from_config(config.mesh.rules)
  min_size = int(config.mesh.min_shard_size)
  shard = lambda tree, axes: sharding.tree_shardings(tree, axes, mesh, rules, min_size)
  teacher_abstract = jax.eval_shape(lambda t: t, task.teacher_params)
  teacher = shard(teacher_abstract, task.param_axes)
  conditioner = shard(jax.eval_shape(lambda c: c, task.conditioner), task.conditioner_axes)
  abstract = jax.eval_shape(state_init(task, config), teacher_abstract, jax.random.key(0))
  student = shard(abstract.student_params, _trainable_axes(task, abstract.student_params))
  fake = shard(abstract.fake_params, _trainable_axes(task, abstract.fake_params))
  replicated = sharding.replicated(mesh)
  opt = lambda tx, opt_state, params: optax.tree_map_params(tx, lambda _, s: s, opt_state, params,
                                                            transform_non_params=lambda _: replicated)
  state = tdm.TDMState(step=replicated, student_params=student, fake_params=fake,
                       student_opt_state=opt(student_tx, abstract.student_opt_state, student),
                       fake_opt_state=opt(fake_tx, abstract.fake_opt_state, fake),
                       ema_params=student if abstract.ema_params is not None else None)
  return Plan(mesh, teacher, conditioner, state, sharding.with_shardings(abstract, state),
              sharding.batch_sharding(mesh))


def initial_state(task: Task, config, p: Plan, teacher_params) -> tdm.TDMState:
  """A fresh state made in its shards, or with `train.init_from` the student of that run's latest
  checkpoint and a fresh fake score and optimisers (a new stage of the recipe)."""
  key = rng.derive(config.seed, 0, rng.Role.INIT)
  networks, optimizers = state_programs(task, config, p)
  state = optimizers(*networks(teacher_params, key))
  source = config.train.init_from
  if not source:
    return state
  previous = Checkpointer(os.path.join(source, "checkpoints"))
  try:
    step = previous.latest_step
    if step is None:
      raise MissingFileError(f"train.init_from={source} holds no checkpoint (no {previous.directory}/<step>); "
                             f"point it at the workdir of a finished earlier stage, or leave it empty")
    rules = sharding.rules_from_config(config.mesh.rules)
    where = lambda path, shape: sharding.NamedSharding(
        p.mesh, sharding.spec_for(shape, None, p.mesh, rules, int(config.mesh.min_shard_size)))
    stored = previous.restore(step, previous.stored_structure(step, where))
  finally:
    previous.close()
  student = stored.get("ema_params") or stored["student_params"]
  expected = jax.tree.map(lambda a: (a.shape, a.dtype), p.abstract_state.student_params)
  got = jax.tree.map(lambda a: (a.shape, a.dtype), student)
  if jax.tree.structure(expected) != jax.tree.structure(got) or expected != got:
    raise CheckpointError(f"train.init_from={source}: the student of step {step} does not fit this run's student "
                          f"(different model, LoRA rank or targets, or tdm.step_choices: a unified student has "
                          f"a step table); use the same model.lora_* and tdm.step_choices settings as that run")
  student = jax.device_put(student, p.state.student_params)
  logging.info("student initialised from %s (step %d); fake score and optimisers start afresh", source, step)
  ema = student if state.ema_params is not None else None
  return state._replace(student_params=student, ema_params=ema)


def distill(task: Task, config, workdir: str, *, progress: Optional[bool] = None, devices=None) -> tdm.TDMState:
  """Runs (or resumes) TDM distillation of `task` to `config.train.num_iterations`.

  Checkpoints go to `workdir/checkpoints` every `train.checkpoint_every` iterations and at the
  end (asynchronously with `train.async_checkpoint`; this returns once the last is complete on
  disk); metrics to `workdir/metrics.jsonl` and `workdir/tensorboard`, fetched from the device
  only at log and checkpoint steps and at the last step. `devices` (default: all) are the devices
  the mesh is made of. Returns the final state.
  """
  tc = config.train
  tdm.TDMConfig.from_config(config.tdm)  # validate before any work
  window = profile_window(tc)
  mesh = sharding.make_mesh(config.mesh.shape, devices)
  multiple = sharding.batch_size_multiple(mesh)
  if tc.batch_size % multiple:
    raise ConfigError(f"train.batch_size={tc.batch_size} must be a multiple of the {multiple} batch shards "
                      f"of mesh.shape={tuple(config.mesh.shape)}")
  make_optimizers(config.optim, tc.num_iterations)  # validate before any work
  os.makedirs(workdir, exist_ok=True)
  if distributed.is_primary():
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=tc.checkpoint_every,
                              keep=tc.keep_checkpoints, async_save=bool(tc.async_checkpoint))
  writer = MetricsWriter(workdir, tensorboard=tc.tensorboard)
  show = tc.progress if progress is None else progress
  try:
    with jax.set_mesh(mesh):
      p = plan(task, config, mesh)
      teacher_params = jax.device_put(task.teacher_params, p.teacher)
      conditioner = jax.device_put(task.conditioner, p.conditioner)
      start, state = checkpointer.restore_latest(p.abstract_state)
      if state is None:
        state, start = initial_state(task, config, p, teacher_params), 0
      else:
        logging.info("resuming from iteration %d", start)
      if task.source is not None:
        task.source.restore(start, checkpointer.metadata(start).get("data") if start else None)
      writer.truncate_after(start)
      if start >= tc.num_iterations:
        return state

      rows = sharding.process_rows(mesh, tc.batch_size)
      inputs_at = lambda step: sharding.global_batch(task.inputs(step, tc.batch_size, rows), mesh, tc.batch_size,
                                                     rows)
      first = inputs_at(start)
      compiled, _ = compile_step(make_train_step(task, config), p, state, teacher_params, conditioner, first)
      state = _iterate(task, tc, compiled, state, teacher_params, conditioner, first, inputs_at, start, len(rows),
                       checkpointer, writer, _Profiler(window, os.path.join(workdir, "profile")), show)
      checkpointer.wait()  # the last checkpoint is complete on disk before this returns
  finally:
    writer.close()
    checkpointer.close()
  return state


def _iterate(task: Task, tc, compiled, state, teacher_params, conditioner, first, inputs_at, start: int,
             num_rows: int, checkpointer: Checkpointer, writer: MetricsWriter, profiler: "_Profiler", show: bool):
  """Iterations `start`..num_iterations-1 of the compiled step, dispatched without waiting for the device:
  the host fetches metrics (and so waits) only at log and checkpoint steps and at the last step, while
  one background thread builds the next iteration's batch (a pure function of its step)."""
  bar = tqdm.tqdm(total=tc.num_iterations, initial=start, desc="tdm", unit="it", dynamic_ncols=True,
                  disable=not show or not distributed.is_primary())
  prefetch = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="tdm_batches")
  upcoming = None
  # iterations per second between log steps; the clock starts after compilation, at the first iteration
  logged, clock = start, time.perf_counter()
  try:
    for step in range(start, tc.num_iterations):
      inputs = first if step == start else upcoming.result()  # the thread's error, as it was raised there
      first = None
      upcoming = prefetch.submit(inputs_at, step + 1) if step + 1 < tc.num_iterations else None
      profiler.before(step)
      state, metrics = compiled(state, teacher_params, conditioner, inputs)
      done = step + 1
      profiler.after(done, state)
      last = done == tc.num_iterations
      log = done % tc.log_every == 0 or last
      save = checkpointer.should_save(done) or last
      if log or save:  # checked before every save: no checkpoint holds a NaN run
        scalars = _host_scalars(metrics)
        _check_finite(done, scalars, checkpointer, tc.log_every)
        bar.set_postfix(fake=f"{scalars['fake_loss']:.4g}", gen=f"{scalars['generator_loss']:.4g}", refresh=False)
        if log:
          now = time.perf_counter()
          scalars["iterations_per_s"] = (done - logged) / max(now - clock, 1e-9)
          logged, clock = done, now
          writer.write(done, scalars)
      bar.update(1)
      if save:
        position = task.source.state(done, num_rows) if task.source is not None else None
        checkpointer.save(done, state, metadata={"data": position} if position else None)
    profiler.stop(state, tc.num_iterations)
  finally:
    prefetch.shutdown(wait=True, cancel_futures=True)
    profiler.stop()
    bar.close()
  return state


def compile_step(train_step, p: Plan, state, teacher_params, conditioner, inputs):
  """The step compiled ahead of time for these arguments (arrays or sharded ShapeDtypeStructs), with
  its shardings and the state donated; returns (compiled, {"trace_s", "compile_s"}) and logs both
  times and XLA's memory analysis per device."""
  step_fn = jax.jit(train_step, in_shardings=(p.state, p.teacher, p.conditioner, p.batch),
                    out_shardings=(p.state, sharding.replicated(p.mesh)), donate_argnums=(0,))
  began = time.perf_counter()
  lowered = step_fn.lower(state, teacher_params, conditioner, inputs)
  traced = time.perf_counter()
  compiled = lowered.compile()
  times = {"trace_s": traced - began, "compile_s": time.perf_counter() - traced}
  logging.info("TDM step traced in %.1f s, compiled in %.1f s", times["trace_s"], times["compile_s"])
  log_memory(compiled, p.mesh)
  return compiled, times


def memory_summary(compiled) -> dict:
  """Per-device bytes of the compiled step from XLA's memory analysis (None where unavailable)."""
  stats = compiled.memory_analysis()
  if stats is None:
    return {}
  out = {name: int(getattr(stats, f"{name}_size_in_bytes")) for name in ("argument", "output", "alias", "temp")}
  out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  return out


def log_memory(compiled, mesh) -> dict:
  summary = memory_summary(compiled)
  if summary:
    gib = {k: round(v / 2**30, 3) for k, v in summary.items()}
    logging.info("compiled TDM step on mesh %s, GiB per device: %s", dict(mesh.shape), gib)
  return summary


def restore_state(task: Task, config, workdir: str, step: Optional[int] = None) -> tdm.TDMState:
  """The saved TDM state of a run (its latest checkpoint unless `step` is given), on the host."""
  abstract = jax.eval_shape(state_init(task, config), jax.eval_shape(lambda t: t, task.teacher_params),
                            jax.random.key(0))
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    step = checkpointer.latest_step if step is None else step
    if step is None:
      raise MissingFileError(f"no checkpoint in {checkpointer.directory}; run --mode=train with this "
                             f"--workdir first")
    return checkpointer.restore(step, abstract)
  finally:
    checkpointer.close()


def student_params(state: tdm.TDMState):
  """The parameters to sample with: the EMA when the run keeps one."""
  return state.ema_params if state.ema_params is not None else state.student_params


def sampling_params(task: Task, params):
  """A tree the teacher's apply samples with: the student itself, or the base merged with its adapters."""
  if task.lora is None:
    return params
  return lora.merge(task.teacher_params, params, task.lora)
