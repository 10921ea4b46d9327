"""Real TDM iterations of a full-size teacher on this CPU: the whole program runs.

  python benchmarks/cpu_iteration.py [--config=configs/sdxl.py] [--resolution=256] [--batch_size=2] [--iterations=2]
  python benchmarks/cpu_iteration.py --config=configs/pixart_alpha.py --config.model.lora_rank=64
  python benchmarks/cpu_iteration.py --config=configs/cogvideox_2b.py --num_frames=9 --height=240 --width=352 --batch_size=1

Random weights made on the mesh from the config's published configs (`model.reference`: the text
encoders and the denoiser as the bf16 frozen teacher), the config's student and fake score (LoRA for
configs/sdxl.py), prompts tokenized by the stand-in tokenizer and encoded inside the step. Prints the time to make the
weights, to trace and compile the step, the wall time of each iteration, its losses, and the
process's peak resident memory. The step and the state's two init programs are compiled from
shapes before any weight is made, so the compiler's own peak memory and the run's are not added
together.
"""

import ctypes
import gc
import os
import resource
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from tdm_jax.core import rng, train  # pylint: disable=g-import-not-at-top,wrong-import-position
from tdm_jax.infra import sharding  # pylint: disable=g-import-not-at-top,wrong-import-position
from tdm_jax.tasks.diffusers import task as diffusers_task  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file("config", "configs/sdxl.py", "The run's config.")
_RESOLUTION = flags.DEFINE_integer("resolution", 256, "Pixels.")
_HEIGHT = flags.DEFINE_integer("height", 0, "Pixels of a non-square frame, with --width (0: --resolution's square).")
_WIDTH = flags.DEFINE_integer("width", 0, "Pixels of a non-square frame, with --height (0: --resolution's square).")
_FRAMES = flags.DEFINE_integer("num_frames", 0, "Video teachers: pixel frames per clip (0: the config's).")
_BATCH = flags.DEFINE_integer("batch_size", 2, "Global batch.")
_ITERATIONS = flags.DEFINE_integer("iterations", 2, "Iterations to run.")


def _peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux reports KiB


def _rss_gib() -> float:
  """The resident memory now (VmRSS), beside the peak so far."""
  with open("/proc/self/status") as f:
    kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
  return kib / 2 ** 20


def _memory() -> str:
  return f"RSS now {_rss_gib():.2f} GiB, peak so far {_peak_rss_gib():.2f} GiB"


def _release_freed_memory() -> None:
  """Hands the compiler's freed heap back to the OS (glibc keeps it otherwise, ~8 GiB here)."""
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass  # not glibc: nothing to do


def main(_):
  config = _CONFIG.value
  config.teacher.pipeline = ""  # shape-only: random weights from configs/diffusers
  config.model.resolution = _RESOLUTION.value
  if _HEIGHT.value or _WIDTH.value:
    config.model.height, config.model.width = _HEIGHT.value, _WIDTH.value
  if _FRAMES.value:
    config.model.num_frames = _FRAMES.value
  config.train.batch_size = _BATCH.value
  config.mesh.shape = (1, 1, 1)
  devices = jax.devices()[:1]
  workdir = tempfile.mkdtemp()
  mesh = sharding.make_mesh(config.mesh.shape, devices)
  with jax.set_mesh(mesh):
    # Compile first, from shapes alone: the compiler's peak memory is spent before any weight exists.
    abstract = diffusers_task.build_task(config, workdir, devices=devices, materialize=False)
    p = train.plan(abstract, config, mesh)
    rows = sharding.process_rows(mesh, config.train.batch_size)
    inputs = lambda step: sharding.global_batch(abstract.inputs(step, config.train.batch_size, rows), mesh,
                                                config.train.batch_size, rows)
    teacher_abstract = sharding.with_shardings(abstract.teacher_params, p.teacher)
    compiled, times = train.compile_step(train.make_train_step(abstract, config), p, p.abstract_state,
                                         teacher_abstract,
                                         sharding.with_shardings(abstract.conditioner, p.conditioner), inputs(0))
    g = abstract.run.geometry
    size = f"{g.frames} x {g.height} x {g.width}" if g.video else f"{g.height} x {g.width}"
    print(f"{config.model.reference} {size} px ({g.tokens} denoiser tokens), batch {config.train.batch_size}, "
          f"LoRA rank {config.model.lora_rank}, "
          f"compute {config.model.dtype}, teacher {config.model.teacher_dtype}, 1 CPU device")
    print(f"trace {times['trace_s']:.1f} s, compile {times['compile_s']:.1f} s; compiled memory (GiB) "
          f"{ {k: round(v / 2**30, 2) for k, v in train.memory_summary(compiled).items()} }; "
          f"{_memory()}", flush=True)
    began = time.perf_counter()
    key = rng.derive(config.seed, 0, rng.Role.INIT)
    networks, optimizers = train.state_programs(abstract, config, p)  # what train.initial_state runs
    networks = networks.lower(teacher_abstract, key).compile()
    optimizers = optimizers.lower(p.abstract_state.student_params, p.abstract_state.fake_params).compile()
    print(f"state init compiled in {time.perf_counter() - began:.1f} s; {_memory()}", flush=True)
    _release_freed_memory()
    print(f"compiler heap returned: {_memory()}", flush=True)
    began = time.perf_counter()
    task = diffusers_task.build_task(config, workdir, devices=devices)
    jax.block_until_ready((task.teacher_params, task.conditioner))
    print(f"random weights: {time.perf_counter() - began:.1f} s; {_memory()}", flush=True)
    state = optimizers(*networks(task.teacher_params, key))
    jax.block_until_ready((task.teacher_params, task.conditioner, state))
    print(f"random weights and initial state: {time.perf_counter() - began:.1f} s; {_memory()}", flush=True)
    # The init programs and the weight makers are done with: drop them and the traces behind them.
    del networks, optimizers
    jax.clear_caches()
    gc.collect()
    _release_freed_memory()
    print(f"init programs and trace caches released: {_memory()}", flush=True)
    for step in range(_ITERATIONS.value):
      start = time.perf_counter()
      state, metrics = compiled(state, task.teacher_params, task.conditioner, inputs(step))
      metrics = jax.device_get(metrics)
      print(f"iteration {step + 1}: {time.perf_counter() - start:.1f} s, fake_loss {float(metrics['fake_loss']):.4g}, "
            f"generator_loss {float(metrics['generator_loss']):.4g}, {_memory()}",
            flush=True)
  print(f"peak resident memory: {_peak_rss_gib():.2f} GiB")


if __name__ == "__main__":
  app.run(main)
