"""Checkpoints through orbax: atomic saves every N iterations, keep M, resume from the latest.

Orbax writes each step to a temporary folder and renames it when complete, so a crash in the
middle of a save leaves the previous checkpoint as the latest. With `async_save` a save returns
once the arrays are copied to host memory (the caller may then donate or overwrite them) and the
writing, the metadata and the rename finish in a background thread; anything that reads the
folder, the next save and `close` wait for it first. A checkpoint that exists but
cannot be read is never skipped or replaced by a fresh initialisation: the run stops and says
which step and folder are broken and how to go on.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from absl import logging

from tdm_jax.infra.errors import UserError

PyTree = Any


class CheckpointError(UserError, RuntimeError):
  """A checkpoint exists but cannot be used."""


def _describe_mismatch(restored: PyTree, abstract: PyTree) -> Optional[str]:
  flat_r = jax.tree_util.tree_flatten_with_path(restored)[0]
  flat_a = jax.tree_util.tree_flatten_with_path(abstract)[0]
  if len(flat_r) != len(flat_a):
    return f"{len(flat_r)} arrays stored, {len(flat_a)} expected"
  for (path, r), (_, a) in zip(flat_r, flat_a):
    if tuple(r.shape) != tuple(a.shape) or r.dtype != a.dtype:
      return (f"{jax.tree_util.keystr(path)} is {r.dtype}{list(r.shape)} in the checkpoint, "
              f"{a.dtype}{list(a.shape)} expected")
  return None


@jax.jit
def _finite_leaves(tree: PyTree) -> PyTree:
  """One replicated boolean per leaf (works on sharded and multi-host arrays)."""
  return jax.tree.map(lambda x: jax.numpy.all(jax.numpy.isfinite(x)) if jax.numpy.issubdtype(
      x.dtype, jax.numpy.inexact) else jax.numpy.bool_(True), tree)


class Checkpointer:
  """A thin, strict layer over `ocp.CheckpointManager` for one tree per step."""

  def __init__(self, directory: str, *, save_every: int = 0, keep: int = 3, async_save: bool = False,
               process_local: bool = False):
    """process_local: this process alone reads or writes (host trees, e.g. process 0 converting or
    exporting while the others wait); by default every process of the job takes part.
    async_save: `save` returns before the checkpoint is on disk (see the module's docstring)."""
    self.directory = os.path.abspath(directory)
    here = jax.process_index()
    local = process_local and jax.process_count() > 1
    multiprocessing = (ocp.options.MultiprocessingOptions(primary_host=here, active_processes={here},
                                                          barrier_sync_key_prefix=f"process{here}")
                       if local else ocp.options.MultiprocessingOptions())
    if local:  # orbax leaves creating the folder to us when not every process takes part
      os.makedirs(self.directory, exist_ok=True)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep if keep > 0 else None, create=not local,
                                           enable_async_checkpointing=async_save,
                                           multiprocessing_options=multiprocessing)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_handlers=ocp.StandardCheckpointHandler())
    self.save_every = save_every

  def path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  @property
  def latest_step(self) -> Optional[int]:
    """The latest complete checkpoint (waiting for a save in flight, which orbax already counts)."""
    self.wait()
    return self._manager.latest_step()

  @property
  def all_steps(self) -> list:
    self.wait()
    return sorted(self._manager.all_steps())

  def should_save(self, step: int) -> bool:
    return self.save_every > 0 and step % self.save_every == 0

  def save(self, step: int, tree: PyTree, metadata: Optional[dict] = None) -> None:
    """Saves `tree` as `step` (atomically; a step already on disk is left as it is), with `metadata`
    (JSON, e.g. the data's position) committed in the same step. Waits for a save in flight first;
    with `async_save` returns once `tree` is copied to the host, before it is on disk."""
    self.wait()
    if step in self._manager.all_steps():
      return
    self._manager.save(step, args=ocp.args.StandardSave(tree), force=True, custom_metadata=metadata or {})

  def metadata(self, step: int) -> dict:
    """The `metadata` saved with `step` ({} when none)."""
    self.wait()
    try:
      return dict(self._manager.metadata(step).custom_metadata or {})
    except Exception as err:  # orbax raises many kinds; all mean the metadata is unusable.
      raise CheckpointError(f"checkpoint of step {step} at {self.path(step)} has no readable metadata "
                            f"({type(err).__name__}: {err})") from err

  def restore(self, step: int, abstract: PyTree) -> PyTree:
    """Restores `step` into the structure, shapes, dtypes and shardings of `abstract`."""
    self.wait()
    path = self.path(step)
    previous = [s for s in self.all_steps if s < step]
    fix = (f"delete {path} to resume from step {previous[-1]}" if previous
           else f"delete {path} to start afresh")
    try:
      restored = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as err:  # orbax and tensorstore raise many kinds; all mean the same here.
      raise CheckpointError(f"checkpoint of step {step} at {path} cannot be read "
                            f"({type(err).__name__}: {err}); {fix}") from err
    mismatch = _describe_mismatch(restored, abstract)
    if mismatch:
      raise CheckpointError(f"checkpoint of step {step} at {path} does not match this run's state: "
                            f"{mismatch}; use another --workdir for a different model or config, or {fix}")
    bad = [jax.tree_util.keystr(p) for p, ok in jax.tree_util.tree_flatten_with_path(_finite_leaves(restored))[0]
           if not bool(ok)]
    if bad:
      raise CheckpointError(f"checkpoint of step {step} at {path} holds non-finite values in "
                            f"{', '.join(bad[:5])}; {fix}")
    logging.info("restored step %d from %s", step, path)
    return restored

  def stored_structure(self, step: int, sharding=None) -> PyTree:
    """The tree of `jax.ShapeDtypeStruct`s saved at `step` (to restore without building the model).

    sharding: one sharding for every array, or a function (path, shape) -> sharding per array.
    """
    self.wait()
    try:
      tree = self._manager.item_metadata(step).tree
    except Exception as err:  # orbax raises many kinds; all mean the metadata is unusable.
      raise CheckpointError(f"checkpoint of step {step} at {self.path(step)} has no readable metadata "
                            f"({type(err).__name__}: {err})") from err
    place = sharding if callable(sharding) else (lambda path, shape: sharding)
    return jax.tree_util.tree_map_with_path(
        lambda path, m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=place(path, tuple(m.shape))), tree)

  def restore_latest(self, abstract: PyTree) -> tuple[Optional[int], Optional[PyTree]]:
    """(step, tree) of the latest complete checkpoint, or (None, None) in an empty folder."""
    step = self.latest_step
    if step is None:
      return None, None
    return step, self.restore(step, abstract)

  def wait(self) -> None:
    """Returns once no save is in flight (raising its error, if it failed)."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
