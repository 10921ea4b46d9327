"""Shared fixtures: a tiny, fast version of the shipped vector example."""

import os
import subprocess
import sys

import pytest

import cpu_flags

pytest_plugins = ("compile_report",)  # `pytest --compile-report=N`: tests/compile_report.py

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)


def tiny_toy_config():
  """configs/toy.py shrunk so that a teacher trains in seconds and an iteration takes milliseconds."""
  from configs import toy  # pylint: disable=g-import-not-at-top
  config = toy.get_config()
  config.model.width = 32
  config.model.depth = 2
  config.model.time_embed_dim = 16
  config.teacher.num_iterations = 100
  config.teacher.batch_size = 64
  config.teacher.warmup_steps = 10
  config.train.batch_size = 16
  config.train.num_iterations = 8
  config.train.checkpoint_every = 4
  config.train.log_every = 1
  config.train.progress = False
  config.train.evaluate_after = False
  config.eval.num_samples = 64
  config.eval.reference_steps = 10
  return config


@pytest.fixture
def toy_config():
  return tiny_toy_config()


@pytest.fixture(scope="session")
def toy_teacher_dir(tmp_path_factory):
  """A workdir whose tiny toy teacher is already trained (copy its `teacher/` to reuse it)."""
  from tdm_jax.tasks.toy import task as toy_task  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp("toy_teacher"))
  toy_task.teacher_params(tiny_toy_config(), workdir, progress=False)
  return workdir


SDXL_PROMPTS = ("a red circle", "a blue square on white background")


@pytest.fixture(scope="session")
def distilled_sdxl(tmp_path_factory):
  """configs/sdxl.py on a tiny SDXL pipeline, as a user runs it: converted, then distilled for three
  iterations (a LoRA student for 1, 2 and 4 steps) from a TFDS prompt dataset written from a prompt
  file, exported and evaluated, stock Diffusers rows included. (pipe, config, workdir, task, state);
  a test that changes the config changes a copy. Its UNet has one resolution and its text encoders two
  layers (tests/test_multiprocess.py's too): the smallest SDXL-style step to compile; the parity tests cover
  deeper UNets and encoders."""
  import tiny_pipeline  # pylint: disable=g-import-not-at-top
  from tdm_jax import main as tdm_main  # pylint: disable=g-import-not-at-top
  from tdm_jax.tasks.diffusers import task as diffusers_task  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("sdxl")
  pipe = tiny_pipeline.make_tiny_sdxl_pipeline(root / "pipeline", transformer_depth=(1,), text_layers=2)
  prompt_file = root / "prompts.txt"
  prompt_file.write_text(SDXL_PROMPTS[0] + "\n\n" + SDXL_PROMPTS[1] + "\n")
  config = tiny_pipeline.tiny_sdxl_config(root / "pipeline", prompt_file)
  subprocess.run([sys.executable, "-m", "tdm_jax.infra.data", str(prompt_file), "--name=sdxl_prompts",
                  f"--data_dir={root / 'tfds'}"], cwd=REPO, check=True, capture_output=True, timeout=120)
  config.data.prompt_source = "tfds:sdxl_prompts"
  config.data.tfds_data_dir = str(root / "tfds")
  config.model.attention = "auto"
  config.tdm.guidance_scale = 2.0
  config.optim.student_lr = 1e-2  # large, so that three iterations move the adapters visibly
  config.optim.lr_scales = (("^class_embedding/", 10.0),)  # and the K table (configs/sdxl.py: 100x 1e-6)
  config.train.num_iterations = 3
  config.train.checkpoint_every = 3
  config.eval.num_samples = 2
  config.eval.teacher_steps = (2,)
  config.eval.student_steps = (1, 2)
  workdir = str(root / "work")
  assert tdm_main.run(config, workdir, "convert") == os.path.join(workdir, "converted")
  state = tdm_main.run(config, workdir, "train")
  return pipe, config, workdir, diffusers_task.build_task(config, workdir), state


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
  """One persistent XLA compilation cache for the whole session, made by the controlling process before
  pytest-xdist starts its workers, so that every worker and every subprocess a test starts (the CLI
  runs, the multi-process job, the notebook's kernel) inherit it: a program compiled once (the same
  tiny step in a killed and a resumed run, in one-process and two-process runs) is loaded, not compiled
  again. Results are the same executables; a test that sets `compilation_cache` itself overrides it.
  XLA:CPU compiles at LLVM level 0 in every test process (tests/cpu_flags.py)."""
  if hasattr(config, "workerinput"):
    return  # a worker: it inherited the controller's environment
  if cpu_flags.FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {cpu_flags.FAST_COMPILE}".strip()
  if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # else a cache the caller chose
    import tempfile  # pylint: disable=g-import-not-at-top
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="tdm_jax_tests_xla_cache_")
  # Every program, however quick to compile: the CLI runs and the multi-process job's processes compile
  # the same hundreds of small ones (initialisers, eager ops) that another process already compiled.
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


# Tests that share a session fixture run in one pytest-xdist worker (`-n 2 --dist loadgroup`, as the README's
# test command runs them); every other file forms its own group, so module fixtures are built once.
SHARED_GROUPS = {"test_diffusers_task": "distilled_sdxl", "test_student_export": "distilled_sdxl"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items):
  del config
  for item in items:
    module = item.module.__name__.rsplit(".", 1)[-1]
    item.add_marker(pytest.mark.xdist_group(SHARED_GROUPS.get(module, module)))
