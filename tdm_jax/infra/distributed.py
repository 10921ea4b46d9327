"""Making the processes of a multi-process run one JAX job, and keeping them in step.

`--jax_distributed` calls `initialize`: on TPU pods and SLURM clusters JAX finds the coordinator,
the process count and this process's id in the environment; elsewhere (two processes on one
machine, a cluster JAX does not detect) they come from flags or the environment variables
TDM_COORDINATOR_ADDRESS, TDM_NUM_PROCESSES and TDM_PROCESS_ID. Every process then runs the same
program over one mesh of all their devices; only process 0 writes logs, metrics, images, exports
and the config, and all of them write their shards of each orbax checkpoint.

A process that cannot join (an unreachable coordinator, fewer processes than announced) would
otherwise wait out JAX's timeout and abort in C++ without a word; here a watchdog ends it after
`timeout_s` with one line that says what to check.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
import time
import uuid
from typing import Callable, Mapping, Optional

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from tdm_jax.infra.errors import DistributedError

ENV_ADDRESS = "TDM_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "TDM_NUM_PROCESSES"
ENV_PROCESS_ID = "TDM_PROCESS_ID"
EXIT_CODE = 2  # the status of every error a user fixes (tdm_jax/main.py)
TOKEN_FILE = ".tdm_jax_token"  # written by process 0, read by all


@dataclasses.dataclass(frozen=True)
class Settings:
  """Where the coordinator is and who this process is; None everywhere: detected by JAX."""
  coordinator_address: Optional[str] = None
  num_processes: Optional[int] = None
  process_id: Optional[int] = None
  timeout_s: int = 300

  @property
  def explicit(self) -> bool:
    return self.coordinator_address is not None


def _int(name: str, value) -> Optional[int]:
  if value is None or value == "":
    return None
  try:
    return int(value)
  except (TypeError, ValueError) as err:
    raise DistributedError(f"{name}={value!r} is not an integer") from err


def settings(coordinator_address: str = "", num_processes: Optional[int] = None, process_id: Optional[int] = None,
             timeout_s: int = 300, environ: Optional[Mapping[str, str]] = None) -> Settings:
  """Settings from flags, else TDM_* environment variables; checked for consistency.

  An address without the other two (or the reverse) is an error: a local run needs all three, and
  a detected cluster none.
  """
  env = os.environ if environ is None else environ
  address = coordinator_address or env.get(ENV_ADDRESS) or None
  count = num_processes if num_processes is not None else _int(ENV_NUM_PROCESSES, env.get(ENV_NUM_PROCESSES))
  index = process_id if process_id is not None else _int(ENV_PROCESS_ID, env.get(ENV_PROCESS_ID))
  given = {"--coordinator_address": address, "--num_processes": count, "--process_id": index}
  missing = [k for k, v in given.items() if v is None]
  if 0 < len(missing) < 3:
    raise DistributedError(f"distributed settings need all of --coordinator_address, --num_processes and "
                           f"--process_id (or {ENV_ADDRESS}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}); missing "
                           f"{', '.join(missing)}. On TPU pods and SLURM give none of them")
  if address is not None:
    if ":" not in address or not address.rsplit(":", 1)[1].isdigit():
      raise DistributedError(f"--coordinator_address={address!r} must be HOST:PORT, e.g. 10.0.0.2:8476 "
                             f"(process 0's host, a free port)")
    if count < 1:
      raise DistributedError(f"--num_processes={count} must be at least 1")
    if not 0 <= index < count:
      raise DistributedError(f"--process_id={index} must be in [0, {count}) for --num_processes={count}")
  if timeout_s <= 0:
    raise DistributedError(f"--distributed_timeout={timeout_s} must be positive (seconds)")
  return Settings(address, count, index, int(timeout_s))


def _give_up(s: Settings) -> None:
  who = f"process {s.process_id} of {s.num_processes}" if s.explicit else "this process"
  where = f"the coordinator at {s.coordinator_address}" if s.explicit else "the detected coordinator"
  sys.stderr.write(
      f"error: {who} could not join {where} within {s.timeout_s} s: the coordinator is unreachable from this "
      f"host, or not all processes started (each needs the same --coordinator_address and --num_processes and "
      f"its own --process_id); raise --distributed_timeout if the others start later\n")
  sys.stderr.flush()
  os._exit(EXIT_CODE)  # pylint: disable=protected-access  # JAX would abort in C++ a little later


def initialize(s: Settings) -> None:
  """`jax.distributed.initialize` with a bounded, explained wait; then quiet logs on processes > 0."""
  watchdog = threading.Timer(s.timeout_s, _give_up, args=(s,))
  watchdog.daemon = True
  watchdog.start()
  try:
    # JAX's own deadline lies past the watchdog's, so the watchdog speaks first; the shutdown wait is long
    # because process 0 alone exports and evaluates after training while the others wait to exit.
    kwargs = dict(initialization_timeout=s.timeout_s + 60, shutdown_timeout_seconds=24 * 3600)
    if s.explicit:
      jax.distributed.initialize(s.coordinator_address, s.num_processes, s.process_id, **kwargs)
    else:
      jax.distributed.initialize(**kwargs)
  except ValueError as err:  # nothing detected: no coordinator address anywhere
    raise DistributedError(f"--jax_distributed found no cluster to join ({err}); on TPU pods and SLURM JAX "
                           f"finds it by itself, elsewhere pass --coordinator_address, --num_processes and "
                           f"--process_id (or set {ENV_ADDRESS}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID})") from err
  finally:
    watchdog.cancel()
  if s.explicit and jax.process_count() != s.num_processes:
    raise DistributedError(f"--num_processes={s.num_processes} but {jax.process_count()} processes joined")
  if not is_primary():
    logging.set_verbosity(logging.ERROR)


def is_primary() -> bool:
  """The process that writes files (logs, metrics, images, exports, the config)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches `name` (no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def on_primary(name: str, fn: Callable[[], object]) -> object:
  """Runs `fn` on process 0 while the others wait (e.g. a conversion they then read); returns its
  result on process 0 and None elsewhere. An error on process 0 is raised there after the others
  are released, so that no process waits for ever."""
  result, failure = None, None
  if is_primary():
    try:
      result = fn()
    except Exception as err:  # re-raised below, after the barrier; every kind must release the others
      failure = err
  barrier(name)
  if failure is not None:
    raise failure
  return result


def agree(flag: bool) -> np.ndarray:
  """Every process's `flag`, on every process (a length-1 array with one process)."""
  if jax.process_count() == 1:
    return np.asarray([flag])
  return np.asarray(multihost_utils.process_allgather(np.asarray([flag], np.int32))).reshape(-1).astype(bool)


def host_copy(tree):
  """The whole of every (sharded, multi-process) array of `tree` as numpy, on every process."""
  return multihost_utils.process_allgather(tree, tiled=True)


def check_workdir(workdir: str) -> None:
  """Every process can write `workdir`, and they all see the one folder (a checkpoint needs both).

  Each process writes (and removes) a file there, then reads a token process 0 wrote. The outcomes
  are gathered, so every process fails with the same message naming the processes at fault.
  """
  here = jax.process_index()
  reason = ""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".tdm_jax_write_check_{here}")
    with open(probe, "w") as f:
      f.write(str(here))
    os.remove(probe)
  except OSError as err:
    reason = f"{type(err).__name__}: {err}"
  can_write = agree(not reason)
  if not can_write.all():
    bad = [int(i) for i in np.flatnonzero(~can_write)]
    where = f" from process(es) {bad}" if jax.process_count() > 1 else ""
    raise DistributedError(f"--workdir={workdir} cannot be written{where}" + (f" ({reason})" if reason else "") +
                           "; give a folder every process can create and write (a shared filesystem on "
                           "several hosts)")
  if jax.process_count() == 1:
    return
  token = int(multihost_utils.broadcast_one_to_all(np.asarray(uuid.uuid4().int % 2 ** 62, np.int64)))
  token_file = os.path.join(workdir, TOKEN_FILE)
  if here == 0:
    with open(token_file, "w") as f:
      f.write(str(token))
  barrier("tdm_jax_workdir_token")
  deadline = time.monotonic() + 10.0  # shared filesystems may show a new file a moment late
  seen = False
  while True:
    try:
      with open(token_file) as f:
        seen = f.read().strip() == str(token)
    except OSError:
      pass
    if seen or time.monotonic() > deadline:
      break
    time.sleep(0.2)
  shared = agree(seen)
  if here == 0:
    os.remove(token_file)
  if not shared.all():
    bad = [int(i) for i in np.flatnonzero(~shared)]
    raise DistributedError(f"process(es) {bad} do not see the files process 0 writes in --workdir={workdir}: "
                           f"every process must reach the same folder (a shared filesystem, e.g. NFS or a "
                           f"bucket mounted with gcsfuse), not a local path on each host")
