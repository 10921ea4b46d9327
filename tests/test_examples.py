"""The shipped examples run, the README shows them as they are, and TDM beats the teacher's 4 steps."""

import json
import os
import subprocess
import sys

import cpu_flags
from conftest import REPO


def test_readme_shows_the_distill_your_own_example_verbatim():
  with open(os.path.join(REPO, "examples", "distill_your_own.py")) as f:
    code = f.read()
  with open(os.path.join(REPO, "README.md")) as f:
    readme = f.read()
  body = code[code.index("import sys"):]  # all but the module docstring
  assert body.strip() in readme


def test_distill_your_own_example_runs(tmp_path):
  """On one CPU device, as a user runs it: the suite's 8 fake devices only add collectives to its tiny
  steps (52 s -> 36 s of CPU time)."""
  result = subprocess.run([sys.executable, "examples/distill_your_own.py", str(tmp_path), "--quick"], cwd=REPO,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": REPO, "XLA_FLAGS": cpu_flags.xla_flags(1)})
  assert result.returncode == 0, result.stderr[-3000:]
  assert "4-step student samples" in result.stdout
  assert os.path.isdir(tmp_path / "checkpoints" / "50")


def test_toy_student_beats_the_teachers_own_four_steps(tmp_path):
  """The README's claim for the vector example, from its command (configs/toy.py: its teacher as shipped)
  run as a user runs it: one CPU device and XLA's own optimisation level (the suite's level-0 codegen on 8
  fake devices ran these tiny iterations 3x slower). Distilled for 600 of the shipped 1,000 iterations:
  the student has converged by then (teacher's 4 DDIM steps / student's 4 steps: 4.30 at 600, 4.22-4.37 at
  every 100 from 600 to 1,000). At least 3x, not 2x: the undistilled student (the teacher's weights on the
  student's 4-step sampler) is already 2.19x, so 2x would pass with distillation doing nothing."""
  from configs import toy  # pylint: disable=g-import-not-at-top
  config = toy.get_config()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  result = subprocess.run([sys.executable, "-m", "tdm_jax.main", "--config=configs/toy.py", f"--workdir={tmp_path}",
                           "--config.train.progress=False", "--config.train.num_iterations=600"], cwd=REPO,
                          env={**env, "PYTHONPATH": REPO}, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(tmp_path / "eval" / "table.json") as f:
    table = {row["sampler"]: row for row in json.load(f)}
  distance = lambda prefix: next(r for name, r in table.items() if name.startswith(prefix))[
      "energy_distance_to_teacher"]
  teacher_4 = distance("teacher, 4 DDIM")
  student_4 = distance("TDM student, 4 steps")
  floor = distance(f"teacher, {config.eval.reference_steps} steps")
  assert floor < student_4 < teacher_4 / 3, table
