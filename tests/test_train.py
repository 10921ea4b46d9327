"""The distillation loop: one compilation, resumption, strict checkpoints, NaN handling, metrics."""

import glob
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tdm_jax.core import tdm, train
from tdm_jax.infra import checkpoint, metrics
from tdm_jax.tasks.toy import task as toy_task

import cpu_flags
from conftest import REPO


def _task(config, teacher_dir, workdir):
  os.makedirs(workdir, exist_ok=True)
  if not os.path.exists(os.path.join(workdir, "teacher")):
    shutil.copytree(os.path.join(teacher_dir, "teacher"), os.path.join(workdir, "teacher"))
  return toy_task.build_task(config, workdir, progress=False)


def _leaves(state):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state))]


TIMING_KEYS = ("iterations_per_s",)  # measured, never bitwise


def _untimed(records):
  return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def test_iterations_compile_once(toy_config, toy_teacher_dir, tmp_path, monkeypatch):
  """The step is traced once, and from the second iteration on no program is compiled or loaded from
  the persistent cache (counted at every call of the compiled step), so none is made per iteration.
  One run suffices: the first iteration's helpers (metrics, the batch thread) are made before the 2nd call."""
  traces = []
  original = tdm.tdm_iteration

  def counting(*args, **kwargs):
    traces.append(1)
    return original(*args, **kwargs)

  monkeypatch.setattr(tdm, "tdm_iteration", counting)
  programs = []  # compiled here, or found in the tests' persistent compilation cache
  compile_events = ("/jax/core/compile/backend_compile_duration",)
  on_compile = lambda event, *_, **__: programs.append(event) if event in compile_events else None
  on_hit = lambda event, **__: programs.append(event) if event == "/jax/compilation_cache/cache_hits" else None
  jax.monitoring.register_event_duration_secs_listener(on_compile)
  jax.monitoring.register_event_listener(on_hit)
  at_call = []
  compile_step = train.compile_step

  def step_counting(*args, **kwargs):
    compiled, times = compile_step(*args, **kwargs)
    return lambda *a: at_call.append(len(programs)) or compiled(*a), times

  monkeypatch.setattr(train, "compile_step", step_counting)
  toy_config.train.num_iterations = 12
  toy_config.train.checkpoint_every = 0
  toy_config.train.log_every = 1  # metrics fetched and written at every iteration
  try:
    train.distill(_task(toy_config, toy_teacher_dir, str(tmp_path / "run")), toy_config, str(tmp_path / "run"))
  finally:
    jax.monitoring.unregister_event_duration_listener(on_compile)
    jax.monitoring.unregister_event_listener(on_hit)
  assert len(traces) == 1
  assert len(at_call) == 12 and at_call[0] > 0  # the step itself is counted
  assert at_call[-1] == at_call[1], at_call  # nothing compiles per iteration


def test_metrics_written_and_truncated_on_resume(toy_config, toy_teacher_dir, tmp_path):
  workdir = str(tmp_path / "run")
  task = _task(toy_config, toy_teacher_dir, workdir)
  train.distill(task, toy_config, workdir)
  records = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert [r["step"] for r in records] == list(range(1, 9))
  assert {"fake_loss", "generator_loss", "student_lr", "fake_lr"} <= set(records[0])
  assert glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
  # A crash after step 4's checkpoint leaves lines for 5..8; resuming drops them and logs them again.
  shutil.rmtree(os.path.join(workdir, "checkpoints", "8"))
  train.distill(task, toy_config, workdir)
  again = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert [r["step"] for r in again] == list(range(1, 9))
  assert all(r["iterations_per_s"] > 0 for r in again)
  assert _untimed(again) == _untimed(records)  # the resumed run repeats the draws exactly


def test_corrupt_checkpoint_is_an_error_naming_step_and_path(toy_config, toy_teacher_dir, tmp_path):
  workdir = str(tmp_path / "run")
  task = _task(toy_config, toy_teacher_dir, workdir)
  train.distill(task, toy_config, workdir)
  step_dir = os.path.join(workdir, "checkpoints", "8")
  for path in glob.glob(os.path.join(step_dir, "default", "d", "*")):
    with open(path, "r+b") as f:
      f.truncate(10)
  toy_config.train.num_iterations = 12
  with pytest.raises(checkpoint.CheckpointError, match=r"step 8 at .*checkpoints/8.*delete .* resume from step 4"):
    train.distill(task, toy_config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "8"]  # nothing re-initialised


def test_partial_checkpoint_is_an_error(toy_config, toy_teacher_dir, tmp_path):
  workdir = str(tmp_path / "run")
  task = _task(toy_config, toy_teacher_dir, workdir)
  train.distill(task, toy_config, workdir)
  os.remove(os.path.join(workdir, "checkpoints", "8", "default", "_METADATA"))
  with pytest.raises(checkpoint.CheckpointError, match=r"step 8 at .*checkpoints/8"):
    train.restore_state(task, toy_config, workdir)


def test_interrupted_save_resumes_from_previous_checkpoint(toy_config, toy_teacher_dir, tmp_path):
  """An orbax temporary folder (a save cut short) is not a checkpoint: the run resumes before it."""
  straight = str(tmp_path / "straight")
  train.distill(_task(toy_config, toy_teacher_dir, straight), toy_config, straight)
  workdir = str(tmp_path / "run")
  task = _task(toy_config, toy_teacher_dir, workdir)
  toy_config.train.num_iterations = 4
  train.distill(task, toy_config, workdir)
  shutil.copytree(os.path.join(workdir, "checkpoints", "4"),
                  os.path.join(workdir, "checkpoints", "8.orbax-checkpoint-tmp-1234"))
  toy_config.train.num_iterations = 8
  resumed = train.distill(task, toy_config, workdir)
  expected = train.restore_state(task, toy_config, straight)
  assert all(np.array_equal(a, b) for a, b in zip(_leaves(resumed), _leaves(expected)))


def test_nan_loss_stops_with_iteration_named_and_checkpoint_intact(toy_config, toy_teacher_dir, tmp_path):
  workdir = str(tmp_path / "run")
  task = _task(toy_config, toy_teacher_dir, workdir)
  toy_config.train.num_iterations = 4
  train.distill(task, toy_config, workdir)
  good = _leaves(train.restore_state(task, toy_config, workdir))
  poisoned = task.__class__(**{**task.__dict__,
                               "teacher_params": jax.tree.map(lambda x: x * jnp.nan, task.teacher_params)})
  toy_config.train.num_iterations = 8
  with pytest.raises(train.NonFiniteLossError, match=r"iteration 5: .*step 4 at .*checkpoints/4"):
    train.distill(poisoned, toy_config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4"]
  after = _leaves(train.restore_state(task, toy_config, workdir))
  assert all(np.array_equal(a, b) for a, b in zip(good, after))


def test_batch_size_must_divide_over_the_mesh(toy_config, toy_teacher_dir, tmp_path):
  devices = jax.device_count()
  toy_config.mesh.shape = (-1, 1, 1)
  toy_config.train.batch_size = 2 * devices
  toy_config.train.num_iterations = 2
  workdir = str(tmp_path / "run")
  task = _task(toy_config, toy_teacher_dir, workdir)
  train.distill(task, toy_config, workdir)  # a multiple of the batch shards
  toy_config.train.batch_size = 2 * devices + 1
  toy_config.mesh.shape = (-1, 1, 1) if devices > 1 else (2, 1, 1)  # one device: a mesh it cannot fill
  with pytest.raises(ValueError, match="mesh.shape"):
    train.distill(task, toy_config, str(tmp_path / "other"))


def test_state_programs_equal_one_init_and_leave_the_teacher_alone(toy_config, toy_teacher_dir, tmp_path):
  """The fresh state made by two programs (networks, then optimisers on the donated networks) is
  the one-program init, and the teacher the networks were copied from is still there."""
  toy_config.train.ema_decay = 0.9
  task = _task(toy_config, toy_teacher_dir, str(tmp_path / "run"))
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
  p = train.plan(task, toy_config, mesh)
  key = jax.random.key(3)
  networks, optimizers = train.state_programs(task, toy_config, p)
  split = optimizers(*networks(task.teacher_params, key))
  whole = jax.jit(train.state_init(task, toy_config))(task.teacher_params, key)
  assert jax.tree.structure(split) == jax.tree.structure(whole)
  for a, b in zip(_leaves(split), _leaves(whole)):
    np.testing.assert_array_equal(a, b)
  assert not any(x.is_deleted() for x in jax.tree.leaves(task.teacher_params))
  for a, b in zip(_leaves(split.student_params), _leaves(task.teacher_params)):
    np.testing.assert_array_equal(a, b)


def test_metrics_fetched_only_at_log_checkpoint_and_last_steps(toy_config, toy_teacher_dir, tmp_path, monkeypatch):
  fetches, checked = [], []
  host_scalars, check_finite = train._host_scalars, train._check_finite
  monkeypatch.setattr(train, "_host_scalars", lambda m: fetches.append(1) or host_scalars(m))
  monkeypatch.setattr(train, "_check_finite", lambda step, *a, **k: checked.append(step) or check_finite(step, *a, **k))
  toy_config.train.log_every = 3
  toy_config.train.checkpoint_every = 4
  workdir = str(tmp_path / "run")
  train.distill(_task(toy_config, toy_teacher_dir, workdir), toy_config, workdir)
  assert checked == [3, 4, 6, 8] and len(fetches) == 4  # log steps, checkpoint steps, the last step
  records = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert [r["step"] for r in records] == [3, 6, 8]
  assert all(r["iterations_per_s"] > 0 for r in records)


def test_nan_between_log_steps_stops_before_the_next_checkpoint(toy_config, toy_teacher_dir, tmp_path):
  """Metrics are fetched before every save: a NaN run is never checkpointed, however rare the log steps."""
  workdir = str(tmp_path / "run")
  task = _task(toy_config, toy_teacher_dir, workdir)
  toy_config.train.log_every = 100
  toy_config.train.num_iterations = 4
  train.distill(task, toy_config, workdir)
  poisoned = task.__class__(**{**task.__dict__,
                               "teacher_params": jax.tree.map(lambda x: x * jnp.nan, task.teacher_params)})
  toy_config.train.num_iterations = 12
  with pytest.raises(train.NonFiniteLossError, match=r"iteration 8: .*log_every=100.*step 4 at .*checkpoints/4"):
    train.distill(poisoned, toy_config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4"]  # no NaN step, no temporary folder


def test_async_checkpoints_equal_synchronous_ones_and_are_complete_on_return(toy_config, toy_teacher_dir, tmp_path):
  """Asynchronous saves (the default, which the resume tests above and below also run with) give the
  synchronous run's checkpoints and metrics bitwise; the run returns with every one complete on disk."""
  runs = {}
  for name, use_async in (("sync", False), ("async", True)):
    toy_config.train.async_checkpoint = use_async
    workdir = str(tmp_path / name)
    task = _task(toy_config, toy_teacher_dir, workdir)
    runs[name] = workdir, train.distill(task, toy_config, workdir)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "8"]  # no temporary folder
  assert all(np.array_equal(a, b) for a, b in zip(_leaves(runs["sync"][1]), _leaves(runs["async"][1])))
  for step in (4, 8):
    a = _leaves(train.restore_state(task, toy_config, runs["sync"][0], step))
    b = _leaves(train.restore_state(task, toy_config, runs["async"][0], step))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
  read = lambda name: _untimed(metrics.read_jsonl(os.path.join(runs[name][0], "metrics.jsonl")))
  assert read("async") == read("sync")


def test_async_save_keeps_metadata(tmp_path):
  directory = str(tmp_path / "checkpoints")
  saver = checkpoint.Checkpointer(directory, async_save=True)
  tree = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.int32(5)}
  saver.save(5, tree, metadata={"data": {"position": 40}})
  assert saver.metadata(5) == {"data": {"position": 40}}  # waits for the save in flight
  saver.save(6, jax.tree.map(lambda x: x + 1, tree), metadata={"data": {"position": 48}})
  saver.close()
  reader = checkpoint.Checkpointer(directory)
  try:
    assert reader.all_steps == [5, 6]
    assert reader.metadata(6) == {"data": {"position": 48}}
    restored = reader.restore(6, jax.eval_shape(lambda: tree))
    np.testing.assert_array_equal(restored["w"], np.arange(6.0).reshape(2, 3) + 1)
  finally:
    reader.close()


def test_next_batch_is_built_in_a_thread_whose_errors_surface(toy_config, toy_teacher_dir, tmp_path):
  workdir = str(tmp_path / "run")
  task = _task(toy_config, toy_teacher_dir, workdir)
  built = []

  def batch(step, batch_size):
    built.append((step, threading.current_thread().name))
    if step == 6 and fail:
      raise ValueError("no prompts left for iteration 6")
    return task.batch(step, batch_size)

  fail = False
  toy_config.train.checkpoint_every = 0
  toy_config.train.num_iterations = 4
  train.distill(task.__class__(**{**task.__dict__, "batch": batch}), toy_config, workdir)
  assert [step for step, _ in built] == [0, 1, 2, 3]
  assert built[0][1] == threading.current_thread().name  # the first batch, needed to compile
  assert all(name.startswith("tdm_batches") for _, name in built[1:])
  fail = True
  toy_config.train.num_iterations = 8
  with pytest.raises(ValueError, match="no prompts left for iteration 6"):
    train.distill(task.__class__(**{**task.__dict__, "batch": batch}), toy_config, str(tmp_path / "failing"))
  assert not [t for t in threading.enumerate() if t.name.startswith("tdm_batches")]  # the thread is gone


def test_profile_steps_write_a_trace(toy_config, toy_teacher_dir, tmp_path):
  workdir = str(tmp_path / "run")
  toy_config.train.profile_steps = (2, 2)
  toy_config.train.checkpoint_every = 0
  toy_config.train.num_iterations = 5
  train.distill(_task(toy_config, toy_teacher_dir, workdir), toy_config, workdir)
  runs = glob.glob(os.path.join(workdir, "profile", "plugins", "profile", "*"))
  assert len(runs) == 1
  assert glob.glob(os.path.join(runs[0], "*.xplane.pb"))
  assert os.path.isfile(os.path.join(runs[0], "perfetto_trace.json.gz"))


@pytest.mark.parametrize("value", [(3,), (-1, 2), (2, 0), (8, 1), (1.5, 2), (1, 2, 3)])
def test_bad_profile_steps_is_a_config_error(toy_config, tmp_path, value):
  toy_config.train.profile_steps = value
  with pytest.raises(train.ConfigError, match=r"train\.profile_steps="):
    train.distill(None, toy_config, str(tmp_path / "run"))  # before any work: the task is never read
  assert not os.path.exists(tmp_path / "run")


# --- the command line, in subprocesses -------------------------------------------------------------

_TINY_FLAGS = [
    "--config=configs/toy.py", "--config.model.width=32", "--config.model.depth=2",
    "--config.model.time_embed_dim=16", "--config.teacher.num_iterations=100", "--config.teacher.batch_size=64", "--config.teacher.warmup_steps=10",
    "--config.train.batch_size=16", "--config.train.evaluate_after=False", "--config.train.progress=False",
]


def _main(workdir, *extra, wait=True, env=None, base=tuple(_TINY_FLAGS)):
  cmd = [sys.executable, "-m", "tdm_jax.main", f"--workdir={workdir}", *base, *extra]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
  if wait:
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_unknown_config_key_names_it_and_the_nearest(tmp_path):
  result = _main(str(tmp_path), "--config.train.batchsize=8")
  assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
  line = result.stderr.strip().splitlines()[-1]
  assert line.startswith("error: --config.train.batchsize: ") and "batch_size" in line, line
  assert "PyTorch was not found" not in result.stderr


def test_unknown_key_in_a_config_file_is_an_error(tmp_path):
  path = tmp_path / "typo.py"
  path.write_text("from configs import toy\n\ndef get_config():\n  config = toy.get_config()\n"
                  "  config.train.num_iteration = 5\n  return config\n")
  cmd = [sys.executable, "-m", "tdm_jax.main", f"--config={path}", f"--workdir={tmp_path / 'w'}"]
  result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": REPO})
  assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
  line = result.stderr.strip().splitlines()[-1]
  assert line.startswith("error: ") and "num_iteration" in line and "num_iterations" in line, line


def test_sigkill_then_resume_is_bitwise_identical(toy_config, toy_teacher_dir, tmp_path):
  """A command-line run SIGKILLed after a checkpoint and resumed by a second one ends bitwise equal to
  an uninterrupted run of the same config. That reference runs in this process (the same devices, XLA
  flags and compiled step as the subprocesses, from the tests' compilation cache): one process start
  less."""
  n = 40
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  flags = [f"--config.train.num_iterations={2 * n}", f"--config.train.checkpoint_every={n}"]
  toy_config.train.num_iterations = 2 * n
  toy_config.train.checkpoint_every = n
  toy_config.train.log_every = 10  # as the command line's configs/toy.py (metrics only; the state is the same)
  task = _task(toy_config, toy_teacher_dir, straight)
  train.distill(task, toy_config, straight)

  shutil.copytree(os.path.join(toy_teacher_dir, "teacher"), os.path.join(killed, "teacher"))
  proc = _main(killed, *flags, wait=False)
  marker = os.path.join(killed, "checkpoints", str(n))
  deadline = time.time() + 240
  while not os.path.isdir(marker) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.005)
  proc.send_signal(signal.SIGKILL)
  assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
  assert os.path.isdir(marker)
  resumed = _main(killed, *flags)
  assert resumed.returncode == 0, resumed.stderr[-2000:]

  a = _leaves(train.restore_state(task, toy_config, straight, step=2 * n))
  b = _leaves(train.restore_state(task, toy_config, killed, step=2 * n))
  assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("case", ["mesh", "workdir", "pipeline"])
def test_user_errors_print_one_line_and_exit_2(tmp_path, case):
  """A mistake the user fixes is one line on stderr and exit status 2; --verbosity=1 adds the traceback."""
  workdir, flags, message, base = str(tmp_path / "w"), [], "", _TINY_FLAGS
  if case == "mesh":
    flags, message = ["--config.mesh.shape=(3,1,1)"], "mesh.shape=(3, 1, 1) needs 3 devices"
  elif case == "workdir":
    (tmp_path / "a_file").write_text("")
    workdir, message = str(tmp_path / "a_file" / "w"), "cannot be written (NotADirectoryError"
  else:
    flags, message, base = [f"--config.teacher.pipeline={tmp_path / 'nowhere'}"], "nowhere", ["--config=configs/sdxl.py"]
  env = {"XLA_FLAGS": cpu_flags.xla_flags(1)}
  result = _main(workdir, *flags, env=env, base=base)
  assert result.returncode == 2, result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and message in last, last
  verbose = _main(workdir, *flags, "--verbosity=1", env=env, base=base)
  assert verbose.returncode != 0 and "Traceback" in verbose.stderr


def test_compilation_cache_is_written_then_read(toy_teacher_dir, tmp_path):
  """config.compilation_cache: the first process writes the compiled step into the folder; a second
  one with the same programs finds every one there (it adds no entry)."""
  cache = tmp_path / "cache"
  flags = ["--config.train.num_iterations=2", "--config.train.checkpoint_every=0",
           f"--config.compilation_cache={cache}"]
  entries = []
  for name in ("cold", "warm"):
    shutil.copytree(os.path.join(toy_teacher_dir, "teacher"), tmp_path / name / "teacher")
    result = _main(str(tmp_path / name), *flags, env={"XLA_FLAGS": cpu_flags.xla_flags(1)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"persistent compilation cache in {cache}" in result.stderr
    entries.append(sorted(os.listdir(cache)))
  assert [e for e in entries[0] if e.startswith("jit_train_step-")]
  assert entries[1] == entries[0]
