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


def _bpe(symbols: list, ranks: dict) -> list:
  """Byte-pair merging as CLIP's tokenizer does it: always the lowest-ranked adjacent pair first."""
  while len(symbols) > 1:
    pairs = [(ranks.get(pair, len(ranks) + 1), i) for i, pair in enumerate(zip(symbols, symbols[1:]))]
    rank, i = min(pairs)
    if rank > len(ranks):
      break
    symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2:]
  return symbols


def word_tokenizer(words: Sequence[str], max_length: int = 77):
  """A Transformers CLIPTokenizer whose vocabulary is exactly `words`, each one token.

  For pipelines trained on a closed caption vocabulary (the shapes default). Each word gets merges
  that join, left to right, the pieces the merges made so far already leave it in; as later merges
  rank lower, every word ends as one "word</w>" token, and the tokenizer saves and loads like any
  CLIP tokenizer.
  """
  from transformers import CLIPTokenizer  # pylint: disable=g-import-not-at-top
  vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
  ranks = {}
  for word in sorted(set(words)):
    if not word or any(c.isspace() or c.isupper() for c in word):
      raise ValueError(f"tokenizer words must be non-empty, lowercase and without spaces: {word!r}")
    chars = list(word[:-1]) + [word[-1] + "</w>"]
    for piece in chars:
      vocab.setdefault(piece, len(vocab))
    pieces = _bpe(chars, ranks)
    joined = pieces[0]
    for piece in pieces[1:]:
      ranks.setdefault((joined, piece), len(ranks))
      joined += piece
      vocab.setdefault(joined, len(vocab))
  merges = sorted(ranks, key=ranks.get)
  return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
