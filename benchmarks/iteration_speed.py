"""Speed of one jitted TDM iteration on the vector example, and the ratio to a teacher forward.

Run: `python benchmarks/iteration_speed.py [--batch_size=256] [--iterations=50]`. Prints the
compile time, milliseconds per iteration (median of `iterations`), iterations per second, and the
cost of an iteration in teacher forwards (TDM.md: a K-step rollout, one fake-score forward and
backward, one student forward and backward, a 2B-batch teacher call and a fake-score call).
"""

import functools
import os
import statistics
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position

from configs import toy  # pylint: disable=g-import-not-at-top,wrong-import-position
from tdm_jax.core import train  # pylint: disable=g-import-not-at-top,wrong-import-position
from tdm_jax.infra import sharding  # pylint: disable=g-import-not-at-top,wrong-import-position
from tdm_jax.tasks.toy import task as toy_task  # pylint: disable=g-import-not-at-top,wrong-import-position

_BATCH = flags.DEFINE_integer("batch_size", 256, "Global batch size.")
_ITERATIONS = flags.DEFINE_integer("iterations", 50, "Timed iterations.")


def _median_ms(fn, *args, repeats):
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(1000 * (time.perf_counter() - start))
  return statistics.median(times)


def main(_):
  config = toy.get_config()
  config.teacher.num_iterations = 10  # weights do not matter for speed
  config.train.batch_size = _BATCH.value
  task = toy_task.build_task(config, tempfile.mkdtemp(), progress=False)
  mesh = sharding.make_mesh(config.mesh.shape)
  with jax.set_mesh(mesh):
    p = train.plan(task, config, mesh)
    teacher = jax.device_put(task.teacher_params, p.teacher)
    state = train.initial_state(task, config, p, teacher)
    cond, uncond = (sharding.shard_batch(x, mesh) for x in task.batch(0, _BATCH.value))
    compiled, times = train.compile_step(train.make_train_step(task, config), p, state, teacher, None,
                                         (cond, uncond))
    compile_s = times["trace_s"] + times["compile_s"]
    current = [state]  # the step donates its state: each call takes the previous call's output

    def run():
      current[0] = compiled(current[0], teacher, None, (cond, uncond))[0]
      return current[0]

    iteration_ms = _median_ms(run, repeats=_ITERATIONS.value)
    z = jnp.zeros((_BATCH.value,) + tuple(task.sample_shape))
    t = jnp.full((_BATCH.value,), 500)
    forward = jax.jit(functools.partial(task.apply, cond={"label": jnp.asarray(cond["label"])}))
    forward_ms = _median_ms(forward, teacher, z, t, repeats=_ITERATIONS.value)
  print(f"devices: {jax.device_count()} x {jax.devices()[0].platform}, batch {_BATCH.value}")
  print(f"compile: {compile_s:.2f} s")
  print(f"TDM iteration: {iteration_ms:.2f} ms ({1000 / iteration_ms:.1f} it/s)")
  print(f"teacher forward: {forward_ms:.3f} ms; one iteration = {iteration_ms / forward_ms:.1f} teacher forwards")


if __name__ == "__main__":
  app.run(main)
