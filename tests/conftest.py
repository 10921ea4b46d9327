"""Shared fixtures: a tiny, fast version of the shipped vector example."""

import os
import sys

import pytest

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
  from tdm_jax import toy_task  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp("toy_teacher"))
  toy_task.teacher_params(tiny_toy_config(), workdir, progress=False)
  return workdir
