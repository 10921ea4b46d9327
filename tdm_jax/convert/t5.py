"""Transformers T5 encoder weights <-> our `T5Encoder` parameter tree, and the T5 tokenizer of a folder.

Names are Transformers' `T5EncoderModel` names (`encoder.block.N.layer.0.SelfAttention.q.weight`,
...). Linear weights (out, in) become Dense kernels (in, out); T5LayerNorm `weight` becomes `scale`;
embedding and bias tables are copied. The expected tree comes from `jax.eval_shape` of the module's
init; any unused tensor, unfilled parameter or shape mismatch is an error that names each one.

The token embedding is tied: Transformers 5 saves it once, as `shared.weight`; the checkpoints on the
Hub (PixArt, SD3, CogVideoX text encoders) also hold the copy `encoder.embed_tokens.weight`. Either or
both are read (both must be equal). Export writes `shared.weight`, plus the copy with `tied_copy`.
A full seq2seq checkpoint's `decoder.*` and `lm_head.weight` are not the encoder's and are skipped,
as Transformers' `T5EncoderModel` skips them.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Optional, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tdm_jax.convert.errors import ConversionError, check_mapped_conversion, check_name_map
from tdm_jax.convert.folders import FolderError
from tdm_jax.models.t5 import T5Config, T5Encoder

EMBED_KEYS = ("shared.weight", "encoder.embed_tokens.weight")
IGNORED_PREFIXES = ("decoder.", "lm_head.")
TOKENIZER_FILES = ("spiece.model", "tokenizer.json")
# Words any usable tokenizer splits into known pieces; a broken load maps them to <unk>.
_PROBE = "a photo of a red circle"

Path = Tuple[str, ...]


def _name_map(config: T5Config) -> List[Tuple[Path, str, bool]]:
  """(our parameter path, Transformers name, whether it is a transposed Linear weight)."""
  entries: List[Tuple[Path, str, bool]] = [
      (("shared", "embedding"), EMBED_KEYS[0], False),
      (("relative_attention_bias",), "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", False),
  ]
  ff = ("wi_0", "wi_1", "wo") if config.is_gated_act else ("wi", "wo")
  for i in range(config.num_layers):
    ours, theirs = f"block_{i}", f"encoder.block.{i}.layer"
    entries.append(((ours, "self_attention_norm", "scale"), f"{theirs}.0.layer_norm.weight", False))
    entries += [((ours, "self_attention", n, "kernel"), f"{theirs}.0.SelfAttention.{n}.weight", True) for n in "qkvo"]
    entries.append(((ours, "feed_forward_norm", "scale"), f"{theirs}.1.layer_norm.weight", False))
    entries += [((ours, "feed_forward", n, "kernel"), f"{theirs}.1.DenseReluDense.{n}.weight", True) for n in ff]
  entries.append((("final_layer_norm", "scale"), "encoder.final_layer_norm.weight", False))
  return entries


def expected_shapes(config: T5Config, param_dtype: Any = jnp.float32) -> Dict[Path, jax.ShapeDtypeStruct]:
  """Flattened abstract parameter tree of `T5Encoder(config)` (no memory allocated)."""
  model = T5Encoder(config, param_dtype=param_dtype)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32)))
  return flax.traverse_util.flatten_dict(nn.meta.unbox(variables["params"]))


def _checked_map(config: T5Config, expected: Mapping[Path, Any]) -> List[Tuple[Path, str, bool]]:
  return check_name_map("T5", _name_map(config), expected)


def _raise_if_problems(what: str, unused, unfilled, mismatched):
  check_mapped_conversion(what, unused, unfilled, mismatched,
                          hint="Check that the T5Config (num_layers, d_model, d_kv, d_ff, num_heads, "
                               "feed_forward_proj) matches the checkpoint's config.json.")


def _embedding_key(state_dict: Mapping[str, Any]) -> Optional[str]:
  """The key to read the token embedding from (None when absent); both copies must be equal."""
  present = [k for k in EMBED_KEYS if k in state_dict]
  if len(present) == 2 and not np.array_equal(np.asarray(state_dict[present[0]]), np.asarray(state_dict[present[1]])):
    raise ConversionError(f"T5 checkpoint holds two different token embeddings, {present[0]!r} and {present[1]!r} "
                          f"(T5EncoderModel ties them); re-save the checkpoint with one of them")
  return present[0] if present else None


def t5_params_from_state_dict(state_dict: Mapping[str, np.ndarray], config: T5Config,
                              param_dtype: Any = jnp.float32) -> Dict[str, Any]:
  """Transformers `T5EncoderModel` state dict -> our `params` tree (numpy leaves, `param_dtype`).

  Shapes are reported in Transformers' layout (Linear weights as (out, in)).
  """
  expected = expected_shapes(config, param_dtype)
  entries = _checked_map(config, expected)
  embed_key = _embedding_key(state_dict)
  known = {theirs for _, theirs, _ in entries} | set(EMBED_KEYS)
  unused = sorted(k for k in state_dict if k not in known and not k.startswith(IGNORED_PREFIXES))
  unfilled, mismatched, flat = [], [], {}
  for ours, theirs, transpose in entries:
    if theirs == EMBED_KEYS[0]:
      theirs = embed_key
      if theirs is None:
        unfilled.append(" or ".join(EMBED_KEYS))
        continue
    if theirs not in state_dict:
      unfilled.append(theirs)
      continue
    value = np.asarray(state_dict[theirs])
    want = tuple(expected[ours].shape)
    want_theirs = want[::-1] if transpose else want
    if tuple(value.shape) != want_theirs:
      mismatched.append((theirs, want_theirs, tuple(value.shape)))
      continue
    if transpose:
      value = value.T
    flat[ours] = np.ascontiguousarray(value.astype(expected[ours].dtype))
  _raise_if_problems("T5 state dict", unused, unfilled, mismatched)
  return flax.traverse_util.unflatten_dict(flat)


def t5_state_dict_from_params(params: Mapping[str, Any], config: T5Config,
                              tied_copy: bool = False) -> Dict[str, np.ndarray]:
  """Our `params` tree -> Transformers `T5EncoderModel` state dict (numpy, contiguous).

  Writes what Transformers 5's `save_pretrained` writes (`shared.weight` only); `tied_copy=True`
  adds `encoder.embed_tokens.weight`, as the Hub checkpoints hold it.
  """
  flat = flax.traverse_util.flatten_dict(nn.meta.unbox(dict(params)))
  expected = expected_shapes(config)
  entries = _checked_map(config, expected)
  unused = sorted("/".join(p) for p in flat if p not in expected)
  unfilled = sorted("/".join(p) for p in expected if p not in flat)
  mismatched = [("/".join(p), tuple(expected[p].shape), tuple(np.shape(flat[p])))
                for p in expected if p in flat and tuple(np.shape(flat[p])) != tuple(expected[p].shape)]
  _raise_if_problems("T5 parameter tree", unused, unfilled, mismatched)
  out = {}
  for ours, theirs, transpose in entries:
    value = np.asarray(jax.device_get(flat[ours]))
    out[theirs] = np.ascontiguousarray(value.T if transpose else value)
  if tied_copy:
    out[EMBED_KEYS[1]] = out[EMBED_KEYS[0]]
  return out


def load_tokenizer(folder):
  """The T5 tokenizer of a `tokenizer/` folder: `spiece.model` (PixArt's layout, with
  `tokenizer_config.json`) or `tokenizer.json` (newer saves), as Transformers loads it.

  Loaded with `T5TokenizerFast.from_pretrained`; `T5Tokenizer(vocab_file=...)` is not used:
  Transformers 5 ignores that argument and maps every piece to <unk>. A tokenizer that maps any piece
  of ordinary words to <unk> is refused.
  """
  import transformers  # pylint: disable=g-import-not-at-top
  folder = os.fspath(folder)
  if not os.path.isdir(folder):
    raise FolderError(f"tokenizer folder {folder!r} does not exist; pass the pipeline's tokenizer/ folder")
  if not any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES):
    raise FolderError(f"tokenizer folder {folder!r} lacks both {' and '.join(TOKENIZER_FILES)}; it holds "
                      f"{sorted(os.listdir(folder)) or 'nothing'}; re-download the pipeline's tokenizer/ folder")
  try:
    tokenizer = transformers.T5TokenizerFast.from_pretrained(folder)
  except (OSError, ValueError) as e:
    raise FolderError(f"cannot load the T5 tokenizer in {folder!r} ({type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}); re-download the tokenizer/ folder") from e
  ids = tokenizer(_PROBE, add_special_tokens=False).input_ids
  if not ids or tokenizer.unk_token_id in ids:
    raise FolderError(f"the T5 tokenizer in {folder!r} maps pieces of {_PROBE!r} to <unk>: its vocabulary did "
                      f"not load (or is not T5's); re-download spiece.model / tokenizer.json")
  return tokenizer
