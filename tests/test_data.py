"""Prompt files, per-iteration prompt batches, and the closed-vocabulary tokenizer."""

import pytest
from transformers import CLIPTokenizer

from tdm_jax import data, shapes_data


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
  with pytest.raises(ValueError, match="prompt_file"):
    data.read_prompts("")


def test_prompt_batches_are_a_function_of_seed_and_step():
  prompts = [f"p{i}" for i in range(50)]
  assert data.prompt_batch(prompts, 0, 7, 16) == data.prompt_batch(prompts, 0, 7, 16)
  assert data.prompt_batch(prompts, 0, 7, 16) != data.prompt_batch(prompts, 0, 8, 16)
  assert data.prompt_batch(prompts, 0, 7, 16) != data.prompt_batch(prompts, 1, 7, 16)


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
