"""Prompt sources for distillation (text or JSONL files, TFDS datasets), read per process.

TDM needs no images, only the prompts the student should serve. `prompt_source(config)` opens
`data.prompt_source`: a `.txt` file (one prompt per line), a `.jsonl` file (a "prompt", "caption"
or "text" field), or `tfds:NAME` (a TFDS dataset in `data.tfds_data_dir`, its text in
`data.tfds_text_field`). Each process produces only its own rows of an iteration's global batch:

- files are small and read whole; the prompts of iteration `step` are drawn with replacement by
  (seed, step), so every process agrees on the global batch and keeps only its rows, however many
  processes there are;
- a TFDS dataset is read without TensorFlow (array_record files through `tfds.data_source`), each
  process only its own part of the split (`tfds.split_for_jax_process`), in a fresh permutation per
  epoch; the position reached is saved with every checkpoint and a resumed run continues there.

`python -m tdm_jax.infra.data PROMPTS.txt --name=NAME --data_dir=DIR` writes a prompt file as such a
dataset (`--shapes`: the shipped shapes prompts).
"""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import numpy as np
from absl import logging

from tdm_jax.core import rng
from tdm_jax.infra.errors import ConfigError, MissingFileError, UserError

PROMPT_KEYS = ("prompt", "caption", "text")
TFDS_PREFIX = "tfds:"


def read_prompts(path: str) -> list:
  """Prompts from a `.txt` file (one per line) or a `.jsonl` file (a "prompt", "caption" or "text" field).

  Blank lines are skipped; a missing or empty file is an error that names it.
  """
  if not path:
    raise ConfigError("no prompts given: set --config.data.prompt_source=PATH (.txt, one prompt per line, "
                      ".jsonl with a 'prompt' field, or tfds:NAME)")
  if not os.path.isfile(path):
    raise MissingFileError(f"prompt file {path} does not exist (config.data.prompt_source)")
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
          raise ConfigError(f"{path}:{number} is not valid JSON ({err})") from err
        key = next((k for k in PROMPT_KEYS if isinstance(record, dict) and k in record), None)
        if key is None:
          raise ConfigError(f"{path}:{number} has none of the fields {PROMPT_KEYS}")
        line = str(record[key]).strip()
      prompts.append(line)
  if not prompts:
    raise ConfigError(f"prompt file {path} holds no prompts; put one prompt per line")
  return prompts


def prompt_indices(count: int, seed: int, step: int, batch_size: int) -> np.ndarray:
  """Which of `count` prompts make iteration `step`'s global batch: uniform with replacement, by (seed, step)."""
  gen = np.random.default_rng([seed, step, int(rng.Role.DATA)])
  return gen.integers(0, count, size=batch_size)


class PromptList:
  """Prompts held whole (a file's); the global batch of a step is the same for any number of processes."""

  def __init__(self, prompts: Sequence[str], seed: int, origin: str = "prompts"):
    self.prompts, self.seed, self.origin = list(prompts), seed, origin

  @classmethod
  def from_file(cls, path: str, seed: int) -> "PromptList":
    return cls(read_prompts(path), seed, path)

  def __len__(self) -> int:
    return len(self.prompts)

  def local_prompts(self, step: int, batch_size: int, rows: Sequence[int]) -> list:
    """The prompts of global rows `rows` (this process's) of iteration `step`'s batch of `batch_size`."""
    chosen = prompt_indices(len(self.prompts), self.seed, step, batch_size)
    return [self.prompts[chosen[int(r)]] for r in rows]

  def head(self, n: int) -> list:
    return self.prompts[:n]

  def state(self, step: int, num_rows: int) -> dict:
    del step, num_rows  # batches are a function of the step alone
    return {"source": self.origin, "prompts": len(self.prompts)}

  def restore(self, step: int, saved: Optional[dict]) -> None:
    del step, saved


class TfdsPrompts:
  """A TFDS prompt dataset, each process reading only its part of the split, sequentially.

  Process p holds `len(rows)` rows of every global batch; it takes them from its part of the split
  (`tfds.split_for_jax_process`) at its position, through a permutation of that part drawn afresh
  per epoch from (seed, epoch, p). The position is `restore`d from a checkpoint's `state` and
  advances by `len(rows)` per iteration, so a resumed run, even with another batch size, continues
  where the saved one stopped.
  """

  def __init__(self, name: str, *, split: str = "train", text_field: str = "text", data_dir: str = "",
               seed: int = 0, process_index: Optional[int] = None, process_count: Optional[int] = None,
               shuffle: bool = True):
    import jax  # pylint: disable=g-import-not-at-top
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    self.name, self.split, self.text_field, self.data_dir = name, split, text_field, data_dir or None
    self.seed, self.shuffle = seed, shuffle
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    builder = _tfds_builder(name, data_dir)
    fields = list(builder.info.features.keys()) if hasattr(builder.info.features, "keys") else []
    if text_field not in fields:
      raise ConfigError(f"TFDS dataset {name} has no text field {text_field!r} (its fields: {fields}); set "
                        f"--config.data.tfds_text_field to the one holding the prompts")
    if split.split("[")[0] not in builder.info.splits:  # "train" or a slice of it, "train[:90%]"
      raise ConfigError(f"TFDS dataset {name} has no split {split!r} (its splits: {list(builder.info.splits)}); "
                        f"set --config.data.tfds_split")
    self._tfds = tfds
    part = tfds.split_for_jax_process(split, process_index=self.process_index, process_count=self.process_count)
    self._local = tfds.data_source(name, split=part, data_dir=self.data_dir)
    if len(self._local) == 0:
      raise ConfigError(f"TFDS dataset {name}, split {split!r}, leaves process {self.process_index} of "
                        f"{self.process_count} no records; use a larger split or fewer processes")
    self._origin = (0, 0)  # (step, position) the positions of later steps count from
    self._permutations = {}  # the current epoch's permutation only

  def __len__(self) -> int:
    """Records in this process's part of the split."""
    return len(self._local)

  def _record(self, position: int) -> int:
    epoch, offset = divmod(position, len(self._local))
    if not self.shuffle:
      return offset
    if epoch not in self._permutations:
      self._permutations = {epoch: np.random.default_rng(
          [self.seed, int(rng.Role.DATA), epoch, self.process_index]).permutation(len(self._local))}
    return int(self._permutations[epoch][offset])

  def position(self, step: int, num_rows: int) -> int:
    """Records this process has consumed before iteration `step`, taking `num_rows` per iteration."""
    origin_step, origin_position = self._origin
    if step < origin_step:
      raise ValueError(f"step {step} precedes the restored position (step {origin_step})")
    return origin_position + (step - origin_step) * num_rows

  def local_positions(self, step: int, num_rows: int) -> list:
    """Indices into this process's part of the split of its `num_rows` rows of iteration `step`."""
    start = self.position(step, num_rows)
    return [self._record(p) for p in range(start, start + num_rows)]

  def local_prompts(self, step: int, batch_size: int, rows: Sequence[int]) -> list:
    del batch_size  # each process reads its own records; the global batch is theirs together
    return [_text(self._local[i][self.text_field]) for i in self.local_positions(step, len(rows))]

  def head(self, n: int) -> list:
    """The first `n` prompts of the whole split (evaluation prompts), in dataset order."""
    whole = self._tfds.data_source(self.name, split=self.split, data_dir=self.data_dir)
    return [_text(whole[i][self.text_field]) for i in range(min(n, len(whole)))]

  def state(self, step: int, num_rows: int) -> dict:
    return {"source": TFDS_PREFIX + self.name, "split": self.split, "process_count": self.process_count,
            "position": self.position(step, num_rows)}

  def restore(self, step: int, saved: Optional[dict]) -> None:
    """Continue at the position saved with the checkpoint of `step` (from 0 when it holds none)."""
    if not saved or "position" not in saved:
      if step:
        logging.warning(f"the checkpoint of step {step} holds no dataset position; {self.name} is read from "
                        f"position {step} x rows per process")
      self._origin = (0, 0)
      return
    if saved.get("source") != TFDS_PREFIX + self.name or saved.get("split") != self.split:
      logging.warning(f"the checkpoint's position is in {saved.get('source')}:{saved.get('split')}, this run reads "
                      f"{TFDS_PREFIX}{self.name}:{self.split}; reading from its start")
      self._origin = (step, 0)
      return
    if saved.get("process_count") != self.process_count:
      logging.warning(f"the checkpoint was written by {saved.get('process_count')} processes, this run has "
                      f"{self.process_count}: each reads another part of the split, from the saved position")
    self._origin = (step, int(saved["position"]))


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _tfds_name(source: str) -> str:
  return source[len(TFDS_PREFIX):]


def _tfds_builder(name: str, data_dir: str):
  """The prepared dataset `name` in `data_dir`, read from its files (no builder code, no download)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    return tfds.builder(name, data_dir=data_dir or None, try_gcs=False)
  except Exception as err:  # tfds raises several kinds (not found, no such version, bad name)
    where = data_dir or "TFDS's default data_dir (~/tensorflow_datasets)"
    raise MissingFileError(f"no prepared TFDS dataset {name!r} in {where} ({type(err).__name__}: "
                           f"{str(err).splitlines()[0] if str(err) else ''}); write one with "
                           f"`python -m tdm_jax.infra.data PROMPTS.txt --name={name.split(':')[0]} --data_dir=DIR` and "
                           f"set --config.data.tfds_data_dir=DIR") from err


def prompt_source(config, *, process_index: Optional[int] = None, process_count: Optional[int] = None):
  """The prompts of `config.data`: a PromptList or TfdsPrompts (process: this one unless given)."""
  d = config.data
  source = d.prompt_source
  if source.startswith(TFDS_PREFIX):
    if not _tfds_name(source):
      raise ConfigError(f"data.prompt_source={source!r} names no dataset; write tfds:NAME (or tfds:NAME:VERSION)")
    return TfdsPrompts(_tfds_name(source), split=d.tfds_split, text_field=d.tfds_text_field,
                       data_dir=d.tfds_data_dir, seed=config.seed, process_index=process_index,
                       process_count=process_count)
  return PromptList.from_file(source, config.seed)


def write_tfds_prompts(prompts: Sequence[str], name: str, data_dir: str, *, split: str = "train",
                       text_field: str = "text") -> str:
  """Writes `prompts` as the TFDS dataset `name` (version 1.0.0, array_record, in order) under
  `data_dir`; returns the dataset's folder. Needs no TensorFlow and no network."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  prompts = [str(p) for p in prompts]
  if not prompts:
    raise ConfigError(f"no prompts to write as TFDS dataset {name}")
  if not name.isidentifier() or name != name.lower():
    raise ConfigError(f"TFDS dataset name {name!r} must be lowercase letters, digits and underscores")

  class Prompts(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Prompts for TDM distillation, one record per prompt."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {text_field: tfds.features.Text()}), disable_shuffling=True,
                                   description=f"{len(prompts)} prompts for tdm_jax")

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples()}

    def _generate_examples(self):
      for i, prompt in enumerate(prompts):
        yield i, {text_field: prompt}

  Prompts.name = name
  builder = Prompts(data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return str(builder.data_dir)


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
      raise ConfigError(f"tokenizer words must be non-empty, lowercase and without spaces: {word!r}")
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


def _main(argv=None) -> None:
  """`python -m tdm_jax.infra.data PROMPTS --name=NAME --data_dir=DIR`: a prompt file as a TFDS dataset."""
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(prog="python -m tdm_jax.infra.data",
                                   description="Write a prompt file (.txt or .jsonl) as a TFDS dataset "
                                               "(array_record) that data.prompt_source=tfds:NAME reads.")
  parser.add_argument("prompt_file", nargs="?", default="", help="prompts, one per line (.txt) or .jsonl")
  parser.add_argument("--shapes", action="store_true", help="the shipped shapes training prompts instead")
  parser.add_argument("--name", required=True, help="dataset name (lowercase, e.g. my_prompts)")
  parser.add_argument("--data_dir", required=True, help="TFDS data_dir to write into")
  parser.add_argument("--split", default="train")
  parser.add_argument("--text_field", default="text")
  args = parser.parse_args(argv)
  if args.shapes == bool(args.prompt_file):
    parser.error("give a prompt file or --shapes (one of them)")
  path = args.prompt_file
  if args.shapes:
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tdm_jax/, from tdm_jax/infra/data.py
    path = os.path.join(package, "assets", "shapes", "prompts_train.txt")
  try:
    folder = write_tfds_prompts(read_prompts(path), args.name, args.data_dir, split=args.split,
                                text_field=args.text_field)
  except UserError as err:
    parser.exit(2, f"error: {err}\n")
  print(f"wrote {args.name} ({args.split}) to {folder}; distil from it with "
        f"--config.data.prompt_source=tfds:{args.name} --config.data.tfds_data_dir={args.data_dir}")


if __name__ == "__main__":
  _main()
