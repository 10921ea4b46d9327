"""The command line: `python -m tdm_jax.main --config=configs/<model>.py --workdir=DIR [--mode=...]`.

Modes: `train` distils (resuming from DIR if it holds checkpoints), then exports (Diffusers
pipelines, `train.export_after`) and evaluates (`train.evaluate_after`); `evaluate` evaluates the
latest checkpoint in DIR; `convert` turns `teacher.pipeline` (a Diffusers folder) into
DIR/converted; `export` writes the latest student as a Diffusers `unet/` folder and a whole
pipeline folder under DIR/export; `sample` draws the student of a checkpoint on `--prompt`s (or a
`--prompt_file`) beside the teacher, into DIR/samples; `pretrain` makes a teacher pipeline from nothing
(configs/shapes_teacher.py: the shipped one). Any config field can be overridden as
`--config.train.batch_size=64`; unknown keys are errors.

`--jax_distributed` makes several processes one job (`tdm_jax/infra/distributed.py`, `launch/`); only
`train` spans processes, and process 0 alone exports and evaluates after it. Errors the user
fixes print as one line and exit with status 2; `--verbosity=1` shows their traceback."""

from __future__ import annotations

import os

# Transformers prints "PyTorch was not found..." on import when torch is absent (the normal case here: our
# networks are Flax; torch is only a test-time parity reference). It is advice, not a problem.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import dataclasses  # pylint: disable=wrong-import-position
import importlib  # pylint: disable=wrong-import-position
import json  # pylint: disable=wrong-import-position
import logging as std_logging  # pylint: disable=wrong-import-position
import re  # pylint: disable=wrong-import-position
import sys  # pylint: disable=wrong-import-position

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from tdm_jax.core import train
from tdm_jax.infra import data, distributed, metrics
from tdm_jax.infra.errors import ConfigError, UserError

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
MODES = ("train", "evaluate", "convert", "export", "sample", "pretrain")
# config.task -> the module that turns a config into a Task and evaluates a student on it.
TASKS = {"toy": "tdm_jax.tasks.toy.task", "diffusers": "tdm_jax.tasks.diffusers.task",
         "shapes_teacher": "tdm_jax.tasks.shapes.teacher", "shapes_pixart_teacher": "tdm_jax.tasks.shapes.pixart_teacher",
         "shapes_sd3_teacher": "tdm_jax.tasks.shapes.sd3_teacher",
         "shapes_cogvideox_teacher": "tdm_jax.tasks.shapes.cogvideox_teacher"}

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints, metrics and outputs.")
_MODE = flags.DEFINE_enum("mode", "train", MODES, "What to run.")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "--mode=sample: a prompt (repeat the flag for more).")
_PROMPT_FILE = flags.DEFINE_string("prompt_file", "", "--mode=sample: prompts, one per line (.txt) or .jsonl.")
_DISTRIBUTED = flags.DEFINE_bool(
    "jax_distributed", False, "Join a multi-process job first (jax.distributed): TPU pods and SLURM are detected; "
    "elsewhere give --coordinator_address, --num_processes and --process_id (or TDM_* variables).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "--jax_distributed: process 0's HOST:PORT "
                                   f"(default ${distributed.ENV_ADDRESS}).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "--jax_distributed: how many processes "
                                      f"(default ${distributed.ENV_NUM_PROCESSES}).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "--jax_distributed: this process's index "
                                   f"(default ${distributed.ENV_PROCESS_ID}).")
_TIMEOUT = flags.DEFINE_integer("distributed_timeout", 300, "--jax_distributed: seconds to wait for all "
                                "processes to join before giving up with an error.")


class _OwnInfoOnly(std_logging.Filter):
  """Lets through records at WARNING and above, and this package's own below it."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or record.pathname.startswith(PACKAGE_DIR)


def task_module(config):
  if config.task not in TASKS:
    raise ConfigError(f"config.task={config.task!r} is not one of {sorted(TASKS)}")
  return importlib.import_module(TASKS[config.task])


def run_evaluation(config, workdir: str, module, task, params) -> list:
  """Evaluates the student `params`; writes eval/table.md and eval/table.json in the workdir."""
  rows = module.evaluate(config, workdir, task, params)
  table = metrics.markdown_table(rows)
  out = os.path.join(workdir, "eval")
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "table.md"), "w") as f:
    f.write(table)
  with open(os.path.join(out, "table.json"), "w") as f:
    json.dump(rows, f, indent=2)
  print(table)
  return rows


def _after_training(config, workdir: str, module, task, state) -> None:
  """Export and evaluation of the trained student, by process 0 alone on host copies of the weights
  (the others have nothing left to do and wait to exit)."""
  wanted_export = config.train.export_after and hasattr(module, "export")
  if not (wanted_export or config.train.evaluate_after):
    return
  params = train.student_params(state)
  if jax.process_count() > 1:  # sharded over every process: gather what process 0 will use
    params = distributed.host_copy(params)
    if config.train.evaluate_after:  # the export reads the teacher from its converted folder
      task = dataclasses.replace(task, teacher_params=distributed.host_copy(task.teacher_params))
  if not distributed.is_primary():
    return
  if wanted_export:
    logging.info("student exported to %s", module.export(config, workdir, params, task.run))
  if config.train.evaluate_after:
    run_evaluation(config, workdir, module, task, params)


def run(config, workdir: str, mode: str, prompts=()):
  """Runs `mode`; returns the final state (train), the evaluation rows (evaluate) or a path (convert,
  export, sample: `prompts`). With several processes only `train` runs (on all of them)."""
  module = task_module(config)
  if mode in ("convert", "export", "sample") and not hasattr(module, "export"):
    raise ConfigError(f"--mode={mode} works on Diffusers pipelines (config.task='diffusers'), "
                      f"not on config.task={config.task!r}")
  if mode != "train" and jax.process_count() > 1:
    raise ConfigError(f"--mode={mode} runs in one process; run it without --jax_distributed (only --mode=train "
                      f"spans processes)")
  if mode == "pretrain" or not hasattr(module, "build_task"):
    if mode != "pretrain" or not hasattr(module, "pretrain_pipeline"):
      teachers = ", ".join(f"'{t}'" for t in TASKS if t.endswith("_teacher"))
      raise ConfigError(f"--mode=pretrain goes with the shapes teachers' tasks (config.task {teachers}: "
                        f"configs/shapes*_teacher.py) and those tasks only with it; got --mode={mode} and "
                        f"config.task={config.task!r}")
    return module.pretrain_pipeline(config, workdir)
  if mode == "convert":
    return module.ensure_converted(config, workdir)
  if mode == "train":
    distributed.check_workdir(workdir)
    if hasattr(module, "ensure_converted") and not module.is_shape_only(config, workdir):
      distributed.on_primary("tdm_jax_convert", lambda: module.ensure_converted(config, workdir))
  task = module.build_task(config, workdir, progress=config.train.progress)
  if mode == "train":
    state = train.distill(task, config, workdir)
    _after_training(config, workdir, module, task, state)
    return state
  checkpoint = config.sample.checkpoint if mode == "sample" and config.sample.checkpoint >= 0 else None
  state = train.restore_state(task, config, workdir, checkpoint)
  if mode == "sample":
    return module.sample_prompts(config, workdir, task, train.student_params(state), list(prompts), int(state.step))
  if mode == "export":
    return module.export(config, workdir, train.student_params(state), task.run)
  return run_evaluation(config, workdir, module, task, train.student_params(state))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    config = _CONFIG.value
    getattr(config, "task", None)  # a config file that failed to load raises here
  except OSError as err:  # config_flags defers a config file that failed to load to its first use
    sys.stderr.write(f"error: --config: {_one_line(err)}\n")
    sys.exit(distributed.EXIT_CODE)
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/toy.py")
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required: the folder for checkpoints, metrics and outputs")
  verbose = flags.FLAGS["verbosity"].present and flags.FLAGS.verbosity >= 1
  if not flags.FLAGS["verbosity"].present:
    # Our progress at INFO; the libraries' INFO (orbax logs every save, JAX every compile) only with
    # --verbosity=0. Warnings and errors from anyone.
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_OwnInfoOnly())
  try:
    if _DISTRIBUTED.value:
      distributed.initialize(distributed.settings(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                                  _TIMEOUT.value))
    elif _COORDINATOR.value or _NUM_PROCESSES.value is not None or _PROCESS_ID.value is not None:
      raise ConfigError("--coordinator_address, --num_processes and --process_id take effect only with "
                        "--jax_distributed; add it")
    train.use_compilation_cache(_CONFIG.value.compilation_cache)  # before anything compiles, in every mode
    logging.debug("config:\n%s", _CONFIG.value)
    prompts = list(_PROMPT.value) + (data.read_prompts(_PROMPT_FILE.value) if _PROMPT_FILE.value else [])
    run(_CONFIG.value, _WORKDIR.value, _MODE.value, prompts)
  except UserError as err:  # a fix for the user, not a bug: the message says it all (--verbosity=1: traceback)
    if verbose:
      raise
    sys.stderr.write(f"error: {err}\n")
    sys.exit(distributed.EXIT_CODE)


def _one_line(err: BaseException) -> str:
  while err.args and isinstance(err.args[0], BaseException):  # ml_collections wraps a KeyError in an AttributeError
    err = err.args[0]
  text = err.args[0] if len(err.args) == 1 and isinstance(err.args[0], str) else str(err)
  return " ".join(text.split())


def parse_flags(argv):
  """absl's flag parsing, with a mistake in `--config` or a `--config.KEY=VALUE` override (a key that does
  not exist, a value of the wrong type, a config file that is not there) as one line and exit status 2,
  as every other error the user fixes, instead of the parser's traceback."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as err:
    sys.stderr.write(f"error: {_one_line(err)}\n")
  except (AttributeError, KeyError, TypeError, ValueError, OSError) as err:  # raised by config_flags while parsing
    message = _one_line(err)
    key = re.match(r"'([^']+)'", message)  # ml_collections names a missing key first, quoted
    overrides = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
    named = next((o for o in overrides if key and o.endswith("." + key.group(1))), None)
    where = f"{named}: " if named else ""
    sys.stderr.write(f"error: {where}{message} (--config and its --config.KEY=VALUE overrides name fields of "
                     f"the config file)\n")
  sys.exit(distributed.EXIT_CODE)


def entry_point():
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  sys.exit(entry_point())
