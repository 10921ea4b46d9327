"""A tiny T5 v1.1 text encoder and tokenizer saved as the real folders are (helpers for tests, no tests).

`make_tiny_t5_tokenizer` trains a sentencepiece unigram model on the captions below, in process, and
writes it as PixArt's `tokenizer/` folder is stored (spiece.model + tokenizer_config.json +
special_tokens_map.json) or as Transformers 5 saves one (tokenizer.json + tokenizer_config.json).
`make_tiny_t5_encoder` saves a random `T5EncoderModel` sharded with an index, as the Hub's T5 XXL
text encoders are stored. Its norm weights are randomised too (T5 initialises them to one, which
would hide a swapped norm).
"""

from __future__ import annotations

import copy
import itertools
import os
import tempfile

import torch
import transformers

from tdm_jax.tasks.shapes.pixart_teacher import write_t5_tokenizer


_COLOURS = ("red", "blue", "green", "yellow", "purple", "orange")
_SHAPES = ("circle", "square", "triangle")
_PLACES = ("in the top left", "in the top right", "in the center", "at the bottom left", "at the bottom right")
_BACKGROUNDS = ("white", "black", "gray", "pink")
CAPTIONS = tuple(
    f"a {size} {colour} {shape} {place} on a {background} background"
    for size, colour, shape, place, background in itertools.islice(zip(
        itertools.cycle(("small", "large")), itertools.cycle(_COLOURS), itertools.cycle(_SHAPES),
        itertools.cycle(_PLACES), itertools.cycle(_BACKGROUNDS)), 36)) + (
    "a photo of a cat", "a photo of two dogs playing in the snow", "an old red car parked by the sea",
    "a painting of a mountain lake at sunset", "two squares and one circle", "a blue sky with clouds")

TINY_ENCODER = dict(d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
                    relative_attention_num_buckets=8, relative_attention_max_distance=16)


def make_tiny_t5_tokenizer(folder, texts=CAPTIONS, vocab_size=96, extra_ids=8, layout="spiece"):
  """Writes a T5 tokenizer folder and returns it loaded by `AutoTokenizer`.

  vocab_size: an upper bound on the sentencepiece pieces (tiny texts yield fewer); the tokenizer adds
  `extra_ids` sentinels (<extra_id_N>) after them, as T5 adds 100. layout: "spiece" (PixArt's folders)
  or "tokenizer.json" (what Transformers 5's `save_pretrained` writes).
  """
  folder = os.fspath(folder)
  if layout == "tokenizer.json":
    with tempfile.TemporaryDirectory() as tmp:
      make_tiny_t5_tokenizer(tmp, texts, vocab_size, extra_ids).save_pretrained(folder)
    return transformers.AutoTokenizer.from_pretrained(folder)
  if layout != "spiece":
    raise ValueError(f"layout {layout!r} is not 'spiece' or 'tokenizer.json'")
  write_t5_tokenizer(folder, texts, vocab_size, extra_ids)
  return transformers.AutoTokenizer.from_pretrained(folder)


def random_t5_encoder(vocab_size, seed=0, **config) -> transformers.T5EncoderModel:
  """A float32 `T5EncoderModel` (TINY_ENCODER updated by `config`), norm weights randomised, eval mode."""
  torch.manual_seed(seed)
  model = transformers.T5EncoderModel(transformers.T5Config(vocab_size=vocab_size, **{**TINY_ENCODER, **config}))
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "layer_norm" in name:
        p.add_(0.2 * torch.randn_like(p))
  return model.eval()


def make_tiny_t5_encoder(folder, vocab_size, seed=0, max_shard_size="20KB", variant=None, **config):
  """Saves `random_t5_encoder(...)` to `folder` sharded (`model.safetensors.index.json` + shards) and
  returns the float32 model. variant="fp16" saves its float16 copy under that variant name."""
  model = random_t5_encoder(vocab_size, seed, **config)
  saved = copy.deepcopy(model).half() if variant == "fp16" else model
  saved.save_pretrained(os.fspath(folder), max_shard_size=max_shard_size, variant=variant)
  return model
