"""Our TDM iteration beside the same iteration in PyTorch/Diffusers (benchmarks/torch_iteration.py), one process.

  python benchmarks/iteration.py --size=shapes            # the shipped shapes pipeline, batch 32
  python benchmarks/iteration.py --size=sdxl256           # SDXL's architecture at 256 px, batch 1, LoRA r64, bf16
  python benchmarks/iteration.py --size=shapes --torch=eager,compile --repeats=3 --iterations=4

Both sides run the run's own config (configs/shapes.py or configs/sdxl.py) and the same K sequence
(unified TDM draws K per iteration: K of iteration i is our key's), on the same token ids. Shapes:
ours and theirs alternate `--repeats` times, `--iterations` iterations each; the figure is the median
over repetitions of ms per iteration. SDXL: the two do not fit in 24 GiB together, so ours runs first,
is freed, then theirs (random weights on both sides, ours from the published configs, theirs built in
bf16 from the same configs). Also printed: FLOPs per iteration of our compiled step (tdm_jax/infra/flops.py,
loops counted as often as they run, and XLA's cost analysis) in teacher forwards, against the sum of
its parts compiled alone and the textbook count, and MFU when `--peak_tflops` is given.
"""

from __future__ import annotations

import gc
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

from tdm_jax.core import tdm, train  # pylint: disable=wrong-import-position
from tdm_jax.infra import flops, sharding  # pylint: disable=wrong-import-position
from tdm_jax.tasks.diffusers import task as diffusers_task  # pylint: disable=wrong-import-position
from rows import SIZES, Ours, abstract_step_args, row_config  # pylint: disable=wrong-import-position

_SIZE = flags.DEFINE_enum("size", "shapes", SIZES, "Which row (rows.py).")
_TORCH = flags.DEFINE_list("torch", ["eager", "compile"], "PyTorch modes: eager, compile.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Alternating repetitions (shapes).")
_ITERATIONS = flags.DEFINE_integer("iterations", 4, "Iterations per repetition.")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Override the row's batch size.")
_PEAK = flags.DEFINE_float("peak_tflops", 0.0, "The device's peak TFLOP/s in the compute dtype, for MFU "
                           "(H100 SXM bf16 dense: 989); 0: no MFU.")
_FLOPS = flags.DEFINE_bool("flops", True, "Count FLOPs of the step and of its parts.")
_DEVICES = flags.DEFINE_integer("devices", 1, "Our side's devices, as a data-parallel mesh (N, 1, 1); on CPU, "
                                "with XLA_FLAGS=--xla_force_host_platform_device_count=N, one per core.")
_CACHE = flags.DEFINE_string("compilation_cache", "", "config.compilation_cache for our side (e.g. the folder "
                              "compile_cache.py filled, so the SDXL step loads instead of compiling).")
_WORKDIR = flags.DEFINE_string("workdir", "", "Where the shapes teacher is converted (default: a temp dir).")


def theirs(config, ours: Ours, mode: str, reference_only: bool):
  """The PyTorch iteration for the same config: the Diffusers folder the task was converted from, or
  random weights from the published configs."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch_iteration  # pylint: disable=g-import-not-at-top
  dtype = getattr(torch, config.model.dtype)
  if reference_only:
    frozen = torch_iteration.load_frozen(None, dtype, reference=diffusers_task.reference_folder(config))
  else:
    frozen = torch_iteration.load_frozen(config.teacher.pipeline, dtype)
  resolution = ours.task.sample_shape[-1] * 8
  return torch_iteration.TorchTDM(config, frozen, ours.task.schedule, resolution, compile=mode == "compile")


def time_ours(ours: Ours, steps) -> float:
  began = time.perf_counter()
  for s in steps:
    ours.run(s)
  return (time.perf_counter() - began) / len(steps)


def time_theirs(model, ours: Ours, steps, generator) -> float:
  import torch_iteration  # pylint: disable=g-import-not-at-top
  inputs = {s: ours.inputs(s) for s in steps}  # host tokenisation is outside both sides' timing
  began = time.perf_counter()
  for s in steps:
    draws = torch_iteration.torch_draws(ours.cfg, ours.num_steps(s), ours.config.train.batch_size,
                                        ours.task.sample_shape, generator)
    model.iterate(inputs[s], draws)
  return (time.perf_counter() - began) / len(steps)


# -- FLOP accounting ------------------------------------------------------------------------------

def part_flops(config, devices) -> dict:
  """FLOPs of the step's parts compiled alone, at the step's batch B: the teacher's forward (B), the
  student's forward and forward + backward (its trained tree, remat as configured), the guided teacher
  (2B when CFG), the text encoders (prompts and, unless zeroed, negatives).

  Compiled from shapes alone (no weights), before our step's state exists: at SDXL size these five
  compiles beside the resident weights and step did not fit a 24 GiB machine."""
  task = diffusers_task.build_task(config, tempfile.mkdtemp(prefix="tdm_flops_"), devices=devices,
                                   materialize=False)
  mesh = sharding.make_mesh((len(devices), 1, 1), devices)
  cfg = tdm.TDMConfig.from_config(config.tdm)
  b = config.train.batch_size
  with jax.set_mesh(mesh):
    p, teacher, conditioner, inputs = abstract_step_args(task, config, mesh)
    student = p.abstract_state.student_params
    cond, _ = jax.eval_shape(task.conditioning, conditioner, inputs)
    x = jax.ShapeDtypeStruct((b,) + tuple(task.sample_shape), jnp.float32)
    t = jax.ShapeDtypeStruct((b,), jnp.int32)
    extra = {"num_steps": jnp.full((b,), 4, jnp.int32)} if cfg.step_choices else {}
    count = lambda fn, *args: flops.compiled_flops(jax.jit(fn).lower(*args).compile())["flops"]
    student_fn = lambda s, tp, x, t, c: task.networks_over(tp).student(s, x, t, c, **extra)
    squared = lambda s, tp, x, t, c: jnp.sum(student_fn(s, tp, x, t, c).astype(jnp.float32) ** 2)
    teacher_fn = lambda tp, x, t, c: task.apply(tp, x, t, c)
    out = {
        "teacher forward": count(teacher_fn, teacher, x, t, cond),
        "student forward": count(student_fn, student, teacher, x, t, cond),
        "student forward + backward": count(jax.grad(squared), student, teacher, x, t, cond),
        "text encoders": count(task.conditioning, conditioner, inputs),
    }
    if cfg.guidance_scale != 1.0:
      double = lambda a: jax.ShapeDtypeStruct((2 * a.shape[0],) + a.shape[1:], a.dtype)
      out["guided teacher"] = count(teacher_fn, teacher, double(x), double(t), jax.tree.map(double, cond))
    else:
      out["guided teacher"] = out["teacher forward"]
  jax.clear_caches()  # the parts' executables; the abstract task goes with this frame
  return out


def flop_report(ours: Ours, parts: dict, k: int) -> list:
  """Lines: the compiled step's FLOPs in teacher forwards, the sum of its parts, the textbook count."""
  step = flops.compiled_flops(ours.compiled)
  f = parts["teacher forward"]
  # rollout K forwards; fake: fwd+bwd; generator: student fwd+bwd, guided teacher, fake fwd; text encoders
  summed = (k * parts["student forward"] + 2 * parts["student forward + backward"] + parts["guided teacher"]
            + parts["student forward"] + parts["text encoders"])
  lora, remat = bool(ours.config.model.lora_rank), bool(ours.config.model.remat)
  backward = (1 if lora else 2) + (1 if remat else 0)
  textbook = k + 2 * (1 + backward) + (1 if ours.cfg.guidance_scale == 1.0 else 2) + 1
  lines = [f"FLOPs per iteration (matmul + conv, batch {ours.config.train.batch_size}; the unified step's rollout "
           f"counted at its largest K = {k}):",
           f"  compiled step: {step['flops'] / 1e12:.4g} TFLOP = {step['flops'] / f:.2f} teacher forwards "
           f"(XLA's cost analysis, loops once: {step['xla_flops'] / 1e12:.4g} TFLOP = {step['xla_flops'] / f:.2f}; "
           f"loops without a known trip count: {int(step['unknown_trip_loops'])})"]
  lines += [f"  part: {name}: {v / 1e12:.4g} TFLOP = {v / f:.3f} teacher forwards" for name, v in parts.items()]
  lines += [f"  sum of the parts (K fwd + 2 fwd/bwd + guided teacher + fake fwd + text): {summed / f:.2f} teacher "
            f"forwards; step / parts = {step['flops'] / summed:.3f}",
            f"  textbook count (K={k}, {'LoRA' if lora else 'full'} backward = {backward} forwards"
            f"{' with remat' if remat else ''}, CFG {'off' if ours.cfg.guidance_scale == 1.0 else 'on'}): "
            f"{textbook} teacher forwards; step / textbook = {step['flops'] / f / textbook:.3f}"]
  return lines, (step["flops"], parts["student forward"])


def main(_):
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count() or 1)
  size = _SIZE.value
  config = row_config(size, _BATCH.value)
  config.compilation_cache = _CACHE.value
  train.use_compilation_cache(config.compilation_cache)
  workdir = _WORKDIR.value or tempfile.mkdtemp(prefix="tdm_iteration_")
  reference_only = size != "shapes"
  if _DEVICES.value > len(jax.devices()):
    raise SystemExit(f"--devices={_DEVICES.value}: JAX sees {len(jax.devices())}; on CPU set "
                     f"XLA_FLAGS=--xla_force_host_platform_device_count={_DEVICES.value}")
  devices = jax.devices()[:_DEVICES.value]
  parts = part_flops(config, devices) if _FLOPS.value else None
  ours = Ours(config, workdir, devices)
  print(f"[{size}] batch {config.train.batch_size}, sample {tuple(ours.task.sample_shape)}, "
        f"K in {ours.cfg.all_step_counts}, CFG {ours.cfg.guidance_scale}, LoRA rank {config.model.lora_rank}, "
        f"dtype {config.model.dtype}; jax {jax.__version__} on {_DEVICES.value} {jax.devices()[0].device_kind} device(s), torch "
        f"{torch.__version__} with {torch.get_num_threads()} threads")
  print(f"our step: traced in {ours.compile_times['trace_s']:.1f} s, compiled in {ours.compile_times['compile_s']:.1f} s")
  n, reps = _ITERATIONS.value, _REPEATS.value
  k_max = max(ours.cfg.all_step_counts)
  flop_lines, (step_flops, forward_flops) = flop_report(ours, parts, k_max) if _FLOPS.value else ([], (None, None))
  ours.run(0)  # warm-up (first call's allocations); every side starts each repetition at a new step
  modes = list(_TORCH.value)
  results = {"ours": [], **{mode: [] for mode in modes}}
  schedule = [list(range(1 + r * n, 1 + (r + 1) * n)) for r in range(reps)]
  ks = [[ours.num_steps(s) for s in steps] for steps in schedule]
  generator = torch.Generator().manual_seed(0)
  # warm-up steps, one per K (far from the timed ones): torch.compile specialises on what it first sees
  warm, seen = [], set()
  for s in range(100000, 100100):
    if ours.num_steps(s) not in seen:
      seen.add(ours.num_steps(s))
      warm.append(s)
  if "compile" not in modes:
    warm = warm[:1]  # eager has nothing to specialise
  if reference_only:  # one side at a time: ours, freed, then theirs
    for steps in schedule:
      results["ours"].append(time_ours(ours, steps))
    ours.release()
    keep = ours
    for mode in modes:
      model = theirs(config, keep, mode, True)
      time_theirs(model, keep, warm, generator)  # warm-up (and compilation)
      results[mode] += [time_theirs(model, keep, steps, generator) for steps in schedule]
      del model
      gc.collect()
  else:
    models = {mode: theirs(config, ours, mode, False) for mode in modes}
    for mode, model in models.items():
      began = time.perf_counter()
      time_theirs(model, ours, warm, generator)
      print(f"torch {mode}: warm-up ({len(warm)} iterations, one per K{', compiling' if mode == 'compile' else ''}) "
            f"{time.perf_counter() - began:.1f} s")
    for steps in schedule:
      results["ours"].append(time_ours(ours, steps))
      for mode, model in models.items():
        results[mode].append(time_theirs(model, ours, steps, generator))
  print(f"K per iteration, by repetition: {ks}")
  b = config.train.batch_size
  ms = {name: 1000 * statistics.median(v) for name, v in results.items()}
  print(f"| implementation | ms / iteration (median of {reps} x {n}) | samples / s | ours faster by |")
  print("|---|---|---|---|")
  for name, v in ms.items():
    label = "ours (JAX, jitted)" if name == "ours" else f"PyTorch {name}"
    print(f"| {label} | {v:.1f} | {1000 * b / v:.2f} | {v / ms['ours']:.2f}x |")
  for line in flop_lines:
    print(line)
  if step_flops:
    # an iteration at K skips K_max - K of the rollout's student forwards
    mean_flops = statistics.mean(step_flops - (k_max - k) * forward_flops for row in ks for k in row)
    achieved = mean_flops / (ms["ours"] / 1000)
    print(f"ours: {mean_flops / 1e12:.4g} TFLOP per iteration on average over the timed Ks, "
          f"{achieved / 1e12:.3g} TFLOP/s achieved" + (f", MFU {achieved / (_PEAK.value * 1e12):.1%} of "
                                                       f"{_PEAK.value} TFLOP/s" if _PEAK.value > 0 else ""))


if __name__ == "__main__":
  logging.set_verbosity(logging.WARNING)
  app.run(main)
