"""Prompt sources for distillation: text or JSONL files, read once, sampled by (seed, step).

TDM needs no images, only the prompts the student should serve. A batch is a pure function of
the iteration, so a resumed run sees the same prompts; every host draws the same global batch
and keeps its own rows when the batch is placed on the mesh.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

from tdm_jax import rng

PROMPT_KEYS = ("prompt", "caption", "text")


def read_prompts(path: str) -> list:
  """Prompts from a `.txt` file (one per line) or a `.jsonl` file (a "prompt", "caption" or "text" field).

  Blank lines are skipped; a missing or empty file is an error that names it.
  """
  if not path:
    raise ValueError("no prompt file given: set --config.data.prompt_file=PATH (.txt, one prompt per line, "
                     "or .jsonl with a 'prompt' field)")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"prompt file {path} does not exist (config.data.prompt_file)")
  prompts = []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      line = line.strip()
      if not line:
        continue
      if path.endswith(".jsonl"):
        try:
          record = json.loads(line)
        except json.JSONDecodeError as err:
          raise ValueError(f"{path}:{number} is not valid JSON ({err})") from err
        key = next((k for k in PROMPT_KEYS if isinstance(record, dict) and k in record), None)
        if key is None:
          raise ValueError(f"{path}:{number} has none of the fields {PROMPT_KEYS}")
        line = str(record[key]).strip()
      prompts.append(line)
  if not prompts:
    raise ValueError(f"prompt file {path} holds no prompts; put one prompt per line")
  return prompts


def prompt_batch(prompts: Sequence[str], seed: int, step: int, batch_size: int) -> list:
  """The prompts of iteration `step`: drawn uniformly with replacement, deterministic in (seed, step)."""
  gen = np.random.default_rng([seed, step, int(rng.Role.DATA)])
  return [prompts[i] for i in gen.integers(0, len(prompts), size=batch_size)]
