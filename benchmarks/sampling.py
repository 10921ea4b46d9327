"""Sampler overhead: the 4-step student against four single UNet forwards, and against the 50-step CFG teacher.

  python benchmarks/sampling.py --size=shapes      # the shipped shapes pipeline, batch 32
  python benchmarks/sampling.py --size=sdxl256     # SDXL's architecture at 256 px, batch 1 (random weights)

All programs are compiled ahead of time (compile times printed, not counted) and timed as the median
of `--repeats` calls with the batch's conditioning precomputed: one student forward (the unified
student's UNet with its K table), the student's K-step DDIM sampler for each K of `--steps`
(`sample.student_sample`, one `lax.scan`), and the teacher with classifier-free guidance over
`--teacher_steps` DDIM steps (`sample.teacher_sample`, a 2B batch per step). The VAE is not included.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from tdm_jax.core import sample  # pylint: disable=wrong-import-position
from tdm_jax.infra import sharding  # pylint: disable=wrong-import-position
from tdm_jax.tasks.diffusers import task as diffusers_task  # pylint: disable=wrong-import-position
from tdm_jax.tasks.diffusers import weights  # pylint: disable=wrong-import-position
from tdm_jax.tasks.diffusers.description import describe  # pylint: disable=wrong-import-position
from rows import SIZES, row_config  # pylint: disable=wrong-import-position

_SIZE = flags.DEFINE_enum("size", "shapes", SIZES, "Which row (rows.py).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per program (the teacher: 1 when slow).")
_STEPS = flags.DEFINE_list("steps", ["1", "2", "4"], "Student step counts.")
_TEACHER_STEPS = flags.DEFINE_integer("teacher_steps", 50, "The CFG teacher's DDIM steps (0: skip).")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Override the row's batch size.")
_WORKDIR = flags.DEFINE_string("workdir", "", "Where the shapes teacher is converted (default: a temp dir).")


def timed_program(fn, *args, repeats: int):
  """(compile s, median ms) of `fn` compiled ahead of time on these arguments."""
  began = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - began
  jax.block_until_ready(compiled(*args))  # warm-up
  times = []
  for _ in range(repeats):
    began = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(1000 * (time.perf_counter() - began))
  return compile_s, statistics.median(times)


def main(_):
  config = row_config(_SIZE.value, _BATCH.value)
  workdir = _WORKDIR.value or tempfile.mkdtemp(prefix="tdm_sampling_")
  devices = jax.devices()[:1]
  task = diffusers_task.build_task(config, workdir, devices=devices)
  b = config.train.batch_size
  mesh = sharding.make_mesh((1, 1, 1), devices)
  choices = tuple(config.tdm.step_choices)
  with jax.set_mesh(mesh):
    inputs = sharding.global_batch(task.batch(0, b), mesh, b, np.arange(b))
    cond, uncond = jax.jit(task.conditioning)(task.conditioner, inputs)
    teacher = task.teacher_params
    student = teacher
    if choices:  # the unified student's tree: the UNet plus its K table (zeros: timing does not care)
      files, _ = weights.pipeline_files(config, workdir)
      student = {**teacher, **diffusers_task.step_table(describe(files), choices)}
    apply = task.student_apply or task.apply
    z = jax.random.normal(jax.random.key(0), (b,) + tuple(task.sample_shape), jnp.float32)
    t = jnp.full((b,), 999, jnp.int32)
    extra = {"num_steps": jnp.full((b,), 4, jnp.int32)} if choices else {}
    print(f"[{_SIZE.value}] batch {b}, latents {tuple(task.sample_shape)}, dtype {config.model.dtype}, "
          f"jax {jax.__version__} on {jax.devices()[0].device_kind}")
    c, forward = timed_program(lambda p, x, t, c: apply(p, x, t, c, **extra), student, z, t, cond,
                               repeats=_REPEATS.value)
    print(f"| program | compile | ms (median of {_REPEATS.value}) | against K single forwards |")
    print("|---|---|---|---|")
    print(f"| one student forward | {c:.1f} s | {forward:.1f} | |")
    for k in (int(s) for s in _STEPS.value):
      fn = lambda p, z, c, k=k: sample.student_sample(apply, p, task.schedule, z, c, num_steps=k,
                                                      total_steps=config.tdm.total_steps,
                                                      step_conditioning=bool(choices))
      c, ms = timed_program(fn, student, z, cond, repeats=_REPEATS.value)
      print(f"| student, {k} steps | {c:.1f} s | {ms:.1f} | {ms / (k * forward):.3f}x |")
    if _TEACHER_STEPS.value:
      n = _TEACHER_STEPS.value
      fn = lambda p, z, c, u: sample.teacher_sample(task.apply, p, task.schedule, z, c, u, num_steps=n,
                                                    guidance_scale=config.tdm.guidance_scale, spacing="trailing")
      c, ms = timed_program(fn, teacher, z, cond, uncond, repeats=1 if _SIZE.value != "shapes" else _REPEATS.value)
      print(f"| teacher, {n} steps, CFG {config.tdm.guidance_scale} (2B per step) | {c:.1f} s | {ms:.1f} | "
            f"{ms / (n * forward):.3f}x ({ms / forward:.0f} forwards' time) |")


if __name__ == "__main__":
  logging.set_verbosity(logging.WARNING)
  app.run(main)
