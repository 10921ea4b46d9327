"""Prompt files and TFDS prompt datasets, per-iteration (per-process) batches, the closed-vocabulary tokenizer."""

import numpy as np
import pytest
from transformers import CLIPTokenizer

from tdm_jax.infra import data
from tdm_jax.tasks.shapes import data as shapes_data


def test_text_and_jsonl_prompt_files(tmp_path):
  txt = tmp_path / "p.txt"
  txt.write_text("a red circle\n\n  a blue square  \n")
  assert data.read_prompts(str(txt)) == ["a red circle", "a blue square"]
  jsonl = tmp_path / "p.jsonl"
  jsonl.write_text('{"prompt": "one"}\n{"caption": "two"}\n')
  assert data.read_prompts(str(jsonl)) == ["one", "two"]


@pytest.mark.parametrize("content, message", [("\n \n", "holds no prompts"), ('{"title": 1}\n', "none of the fields"),
                                              ("{not json\n", "not valid JSON")])
def test_bad_prompt_files_are_named(tmp_path, content, message):
  path = tmp_path / ("p.jsonl" if "{" in content else "p.txt")
  path.write_text(content)
  with pytest.raises(ValueError, match=message) as info:
    data.read_prompts(str(path))
  assert path.name in str(info.value)


def test_missing_prompt_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="nothing.txt"):
    data.read_prompts(str(tmp_path / "nothing.txt"))
  with pytest.raises(ValueError, match="prompt_source"):
    data.read_prompts("")


def test_prompt_batches_are_a_function_of_seed_and_step():
  prompts = [f"p{i}" for i in range(50)]
  batch = lambda seed, step: data.PromptList(prompts, seed).local_prompts(step, 16, range(16))
  assert batch(0, 7) == batch(0, 7)
  assert batch(0, 7) != batch(0, 8)
  assert batch(0, 7) != batch(1, 7)
  # Each process asks for its rows only; together they are the global batch, for any split of the rows.
  source = data.PromptList(prompts, 0)
  assert source.local_prompts(7, 16, range(4)) + source.local_prompts(7, 16, range(4, 16)) == batch(0, 7)


def test_word_tokenizer_gives_one_token_per_caption_word(tmp_path):
  words = shapes_data.vocabulary()
  tokenizer = data.word_tokenizer(words, max_length=32)
  _, captions, _ = shapes_data.batch(0, 0, 50, shapes_data.ShapesConfig())
  unknown = tokenizer.convert_tokens_to_ids("<|endoftext|>")
  assert all(tokenizer.tokenize(word) == [word + "</w>"] for word in words)
  for text in captions:
    ids = tokenizer(text).input_ids
    assert len(ids) == len(text.split()) + 2
    assert unknown not in ids[1:-1]
  tokenizer.save_pretrained(tmp_path)
  again = CLIPTokenizer.from_pretrained(tmp_path)
  assert again(captions[0]).input_ids == tokenizer(captions[0]).input_ids
  with pytest.raises(ValueError, match="lowercase"):
    data.word_tokenizer(["Red"])


# --- TFDS prompt datasets, read per process -------------------------------------------------------

@pytest.fixture(scope="module")
def prompt_dataset(tmp_path_factory):
  """11 prompts written as the TFDS dataset `eleven` (array_record, no TensorFlow)."""
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  prompts = [f"prompt number {i}" for i in range(11)]
  data.write_tfds_prompts(prompts, "eleven", data_dir)
  return data_dir, prompts


def test_tfds_dataset_is_read_without_tensorflow(prompt_dataset):
  import sys  # pylint: disable=g-import-not-at-top
  data_dir, prompts = prompt_dataset
  source = data.TfdsPrompts("eleven", data_dir=data_dir, process_index=0, process_count=1)
  assert len(source) == 11 and source.head(3) == prompts[:3]
  assert "tensorflow" not in sys.modules


def test_two_processes_read_disjoint_rows_whose_union_is_the_global_batch(prompt_dataset):
  data_dir, prompts = prompt_dataset
  readers = [data.TfdsPrompts("eleven", data_dir=data_dir, seed=3, process_index=i, process_count=2) for i in (0, 1)]
  assert [len(r) for r in readers] == [6, 5]  # tfds.split_for_jax_process: each its own part of the split
  batch_size, rows = 4, [np.arange(0, 2), np.arange(2, 4)]  # the global rows each process holds
  seen = [[], []]
  for step in range(2):  # within each process's first epoch: no record twice
    local = [r.local_prompts(step, batch_size, rows[i]) for i, r in enumerate(readers)]
    assert all(len(part) == 2 for part in local)
    assert not set(local[0]) & set(local[1])  # disjoint, and together the global batch of the step
    for i in (0, 1):
      seen[i] += local[i]
  assert len(set(seen[0])) == 4 and len(set(seen[1])) == 4
  assert set(seen[0]) <= set(prompts[:6]) and set(seen[1]) <= set(prompts[6:])
  # A pure function of the step (and the position restored with it): asking again gives the same rows.
  assert readers[0].local_prompts(1, batch_size, rows[0]) == seen[0][2:]


def test_tfds_position_continues_from_the_saved_state(prompt_dataset):
  data_dir, _ = prompt_dataset
  make = lambda: data.TfdsPrompts("eleven", data_dir=data_dir, seed=1, process_index=0, process_count=1)
  straight = make()
  whole = [straight.local_prompts(s, 3, np.arange(3)) for s in range(6)]
  assert straight.state(4, 3)["position"] == 12
  resumed = make()
  resumed.restore(4, straight.state(4, 3))
  assert [resumed.local_prompts(s, 3, np.arange(3)) for s in (4, 5)] == whole[4:]
  bigger = make()  # a resumed run with a larger batch continues at the saved position
  bigger.restore(4, straight.state(4, 3))
  assert bigger.local_positions(4, 6) == straight.local_positions(4, 3) + straight.local_positions(5, 3)
  assert bigger.state(5, 6)["position"] == 18


def test_tfds_dataset_without_the_text_field_is_named(prompt_dataset):
  data_dir, _ = prompt_dataset
  with pytest.raises(ValueError, match=r"no text field 'caption' \(its fields: \['text'\]\).*tfds_text_field"):
    data.TfdsPrompts("eleven", data_dir=data_dir, text_field="caption", process_index=0, process_count=1)


def test_missing_tfds_dataset_says_how_to_write_one(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"no prepared TFDS dataset 'nowhere'.*python -m tdm_jax.infra.data"):
    data.TfdsPrompts("nowhere", data_dir=str(tmp_path), process_index=0, process_count=1)


def test_shipped_shapes_prompts_as_a_tfds_dataset(tmp_path):
  import subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  from tdm_jax.tasks.shapes import teacher as shapes_teacher  # pylint: disable=g-import-not-at-top
  result = subprocess.run([sys.executable, "-m", "tdm_jax.infra.data", "--shapes", "--name=shapes_prompts",
                           f"--data_dir={tmp_path}"], capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert "--config.data.prompt_source=tfds:shapes_prompts" in result.stdout
  shipped = data.read_prompts(shapes_teacher.SHIPPED_TRAIN_PROMPTS)
  source = data.TfdsPrompts("shapes_prompts", data_dir=str(tmp_path), process_index=0, process_count=1)
  assert len(source) == len(shipped) and source.head(5) == shipped[:5]
