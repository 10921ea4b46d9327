"""The shipped vector example as a TDM `Task`, and its evaluation.

A class-conditional MLP teacher learns a 2-D mixture of Gaussians (pretrained here, once per
workdir, then cached as a checkpoint), TDM distils it to a 4-step student, and the evaluation
measures how close each sampler's output is to the teacher's many-step samples.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from tdm_jax.core import pretrain, rng, sample
from tdm_jax.core.schedules import make_schedule
from tdm_jax.core.train import Task
from tdm_jax.infra.checkpoint import Checkpointer
from tdm_jax.models.mlp import MLPDenoiser, init_params
from tdm_jax.tasks.toy import mixture as toy


def mixture_of(config) -> toy.MixtureOfGaussians:
  m = config.model
  return toy.MixtureOfGaussians(dim=m.dim, num_classes=m.num_classes, modes_per_class=m.modes_per_class,
                                mode_std=m.mode_std, seed=m.data_seed)


def build_model(config) -> MLPDenoiser:
  m = config.model
  choices = tuple(config.tdm.step_choices)
  return MLPDenoiser(dim=m.dim, num_classes=m.num_classes, width=m.width, depth=m.depth,
                     time_embed_dim=m.time_embed_dim, max_num_steps=max(choices) if choices else 0)


def make_apply(model: MLPDenoiser):
  """`apply(params, x_t, t, cond, **extra)` over the module's parameter tree."""
  return lambda params, x_t, t, cond, **extra: model.apply({"params": params}, x_t, t, cond, **extra)


def schedule_of(config):
  s = config.schedule
  return make_schedule(s.beta_schedule, s.beta_start, s.beta_end, s.num_train_timesteps, s.prediction_type)


def unconditional(config, batch_size: int):
  return {"label": jnp.full((batch_size,), config.model.num_classes, jnp.int32)}


def teacher_params(config, workdir: str, progress: bool = True):
  """The pretrained teacher of this workdir: restored if saved before, else trained and saved."""
  model = build_model(config)
  apply, schedule, mixture = make_apply(model), schedule_of(config), mixture_of(config)
  init = init_params(model, rng.derive(config.seed, 0, rng.Role.INIT))
  checkpointer = Checkpointer(os.path.join(workdir, "teacher"))
  try:
    if checkpointer.latest_step is not None:
      return checkpointer.restore(checkpointer.latest_step, jax.eval_shape(lambda: init))

    def data(key, batch_size):
      label_key, x_key = jax.random.split(key)
      labels = mixture.sample_labels(label_key, batch_size)
      return mixture.sample(x_key, labels), {"label": labels}, unconditional(config, batch_size)

    t = config.teacher
    logging.info("pretraining the toy teacher for %d iterations", t.num_iterations)
    params = pretrain.pretrain(apply, init, schedule, data, num_iterations=t.num_iterations,
                               batch_size=t.batch_size, learning_rate=t.learning_rate,
                               cond_dropout=t.cond_dropout, seed=config.seed, warmup_steps=t.warmup_steps,
                               progress=progress)
    checkpointer.save(t.num_iterations, params)
    return params
  finally:
    checkpointer.close()


def build_task(config, workdir: str, progress: bool = True) -> Task:
  model = build_model(config)
  num_classes = config.model.num_classes

  def batch(step: int, batch_size: int):
    gen = np.random.default_rng([config.seed, step, int(rng.Role.DATA)])
    labels = gen.integers(0, num_classes, size=(batch_size,), dtype=np.int32)
    return {"label": labels}, {"label": np.full((batch_size,), num_classes, np.int32)}

  return Task(apply=make_apply(model), teacher_params=teacher_params(config, workdir, progress),
              schedule=schedule_of(config), sample_shape=(config.model.dim,), batch=batch)


def evaluate(config, workdir: str, task: Task, student_params) -> list:
  """Rows of the evaluation table: each sampler against the teacher's many-step samples.

  All samplers share one noise batch and one balanced set of labels; the reference is the
  teacher with `eval.reference_steps` steps and the same guidance as distillation, from
  independent noise. Its own row (fresh noise again) is the floor the distance can reach.
  Nothing is written to `workdir`: the caller writes the table.
  """
  del workdir
  e, cfg = config.eval, config.tdm
  n, num_classes = e.num_samples, config.model.num_classes
  labels = jnp.asarray(np.arange(n) % num_classes, jnp.int32)
  cond, uncond = {"label": labels}, unconditional(config, n)
  noise = lambda role_step: jax.random.normal(rng.derive(config.seed, role_step, rng.Role.EVAL),
                                              (n,) + tuple(task.sample_shape))
  z, z_ref, z_floor = noise(0), noise(1), noise(2)
  mixture = mixture_of(config)

  def teacher(steps, solver):
    return jax.jit(functools.partial(sample.teacher_sample, task.apply, num_steps=steps,
                                     guidance_scale=cfg.guidance_scale, solver=solver, spacing="trailing"))

  def student(steps):
    return jax.jit(functools.partial(sample.student_sample, task.apply, num_steps=steps,
                                     total_steps=cfg.total_steps, step_conditioning=bool(cfg.step_choices),
                                     solver=e.student_solver))

  calls = 1 if cfg.guidance_scale == 1.0 else 2  # network calls per teacher step
  ref_fn = teacher(e.reference_steps, e.reference_solver)
  reference = np.asarray(sample.timed(ref_fn, task.teacher_params, task.schedule, z_ref, cond, uncond)[0])
  candidates = [(f"teacher, {e.reference_steps} steps, CFG {cfg.guidance_scale} (fresh noise)", "teacher",
                 calls * e.reference_steps, ref_fn, (task.teacher_params, task.schedule, z_floor, cond, uncond))]
  for steps in e.teacher_steps:
    candidates.append((f"teacher, {steps} DDIM steps, CFG {cfg.guidance_scale}", "teacher", calls * steps,
                       teacher(steps, "ddim"), (task.teacher_params, task.schedule, z, cond, uncond)))
  for steps in e.student_steps:
    candidates.append((f"TDM student, {steps} steps", "student", steps, student(steps),
                       (student_params, task.schedule, z, cond)))
  rows = []
  for name, role, nfe, fn, args in candidates:
    x, ms = sample.timed(fn, *args)
    x = np.asarray(x)
    rows.append({
        "sampler": name, "model": role, "nfe": nfe,
        "energy_distance_to_teacher": toy.classwise_energy_distance(x, labels, reference, labels, num_classes),
        "energy_distance_to_data": toy.classwise_energy_distance(
            x, labels, np.asarray(mixture.sample(rng.derive(config.seed, 3, rng.Role.EVAL), labels)), labels,
            num_classes),
        "mode_coverage": toy.mode_coverage(x, labels, mixture),
        "ms_per_sample": ms / n,
    })
  return rows
