"""Metrics to a JSONL log and TensorBoard event files in the workdir.

The JSONL file is the record a script reads back; TensorBoard (tensorboardX, no TensorFlow
needed) is for people. On resume, log lines past the restored step are dropped, so the log of
a preempted run reads like that of an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
from typing import Mapping

from tdm_jax.infra import distributed
from tdm_jax.infra.files import atomic_write_bytes


class MetricsWriter:
  """Writes scalars from process 0 only; other processes hold a no-op writer."""

  def __init__(self, workdir: str, *, tensorboard: bool = True):
    self.enabled = distributed.is_primary()
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      if tensorboard:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def truncate_after(self, step: int) -> None:
    """Drops lines logged after `step` (they belong to iterations that will run again)."""
    if not self.enabled or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    atomic_write_bytes(self.path, "".join(kept).encode("utf-8"))

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    values = {k: float(v) for k, v in scalars.items()}
    record = {"step": int(step), **{k: (v if math.isfinite(v) else str(v)) for k, v in values.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(k, v, step)

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_jsonl(path: str) -> list:
  """The records of a metrics.jsonl file."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def markdown_table(rows: list) -> str:
  """A Markdown table of dict rows (the columns of the first row, floats to 4 significant digits)."""
  columns = list(rows[0])
  fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(fmt(row[c]) for c in columns) + " |" for row in rows]
  return "\n".join(lines) + "\n"
