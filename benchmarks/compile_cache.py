"""Compile time of the TDM step, cold and from the persistent compilation cache (`config.compilation_cache`).

  XLA_FLAGS=--xla_force_host_platform_device_count=1 python benchmarks/compile_cache.py --size=sdxl256

Runs the same child process twice on one empty cache folder: each builds the row's task without
weights (ShapeDtypeStructs), turns the cache on exactly as `main` does (`train.use_compilation_cache`),
then traces and compiles the step as a run does (`train.compile_step`). The first compile fills the
cache, the second is a restarted job's. Prints both (trace, compile) pairs and the ratio. The cache
skips XLA's compilation only; tracing and lowering the Python program happen in every process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from rows import SIZES, abstract_step_args, row_config  # pylint: disable=wrong-import-position

_SIZE = flags.DEFINE_enum("size", "sdxl256", SIZES, "Which row (rows.py).")
_CACHE = flags.DEFINE_string("cache_dir", "", "An empty folder for the cache (default: a new temporary one).")
_CHILD = flags.DEFINE_string("child", "", "Internal: compile once with this cache folder, print JSON.")


def compile_once(size: str, cache: str) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from tdm_jax.core import train  # pylint: disable=g-import-not-at-top
  from tdm_jax.infra import sharding  # pylint: disable=g-import-not-at-top
  from tdm_jax.tasks.diffusers import task as diffusers_task  # pylint: disable=g-import-not-at-top
  config = row_config(size)
  config.compilation_cache = cache
  train.use_compilation_cache(config.compilation_cache)
  devices = jax.devices()[:1]
  task = diffusers_task.build_task(config, tempfile.mkdtemp(), devices=devices, materialize=False)
  mesh = sharding.make_mesh((1, 1, 1), devices)
  with jax.set_mesh(mesh):
    p, teacher, conditioner, inputs = abstract_step_args(task, config, mesh)
    _, times = train.compile_step(train.make_train_step(task, config), p, p.abstract_state, teacher, conditioner,
                                  inputs)
  return times


def main(_):
  if _CHILD.value:
    print("RESULT " + json.dumps(compile_once(_SIZE.value, _CHILD.value)))
    return
  cache = _CACHE.value or tempfile.mkdtemp(prefix="tdm_compile_cache_")
  if os.path.isdir(cache) and os.listdir(cache):
    raise SystemExit(f"--cache_dir={cache} is not empty: the cold compile needs an empty cache")
  results = []
  for run in ("cold", "warm"):
    began = time.perf_counter()
    out = subprocess.run([sys.executable, os.path.abspath(__file__), f"--size={_SIZE.value}", f"--child={cache}"],
                         capture_output=True, text=True, check=False)
    if out.returncode:
      raise SystemExit(f"the {run} child failed:\n{out.stderr[-4000:]}")
    times = json.loads(next(l for l in out.stdout.splitlines() if l.startswith("RESULT "))[len("RESULT "):])
    times["process_s"] = time.perf_counter() - began
    results.append(times)
    print(f"{run}: traced in {times['trace_s']:.1f} s, compiled in {times['compile_s']:.1f} s "
          f"(whole process {times['process_s']:.1f} s)")
  entries = len(os.listdir(cache))
  size = sum(os.path.getsize(os.path.join(cache, f)) for f in os.listdir(cache)) / 2**20
  print(f"cache {cache}: {entries} entries, {size:.1f} MiB; warm compile {results[0]['compile_s'] / results[1]['compile_s']:.1f}x "
        f"faster than cold, whole process {results[0]['process_s'] / results[1]['process_s']:.2f}x")


if __name__ == "__main__":
  logging.set_verbosity(logging.WARNING)
  app.run(main)
