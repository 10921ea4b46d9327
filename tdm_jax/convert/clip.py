"""Transformers CLIP text-encoder weights <-> our `CLIPTextEncoder` parameter tree.

Names are Transformers' (`text_model.encoder.layers.N.self_attn.q_proj.weight`, ...,
`text_projection.weight`). Linear weights (out, in) become Dense kernels (in, out); LayerNorm
`weight` becomes `scale`; embeddings are copied. The expected tree comes from `jax.eval_shape`
of the module's init, so nothing is allocated to check shapes. Any unused checkpoint tensor,
unfilled parameter or shape mismatch is an error that names each one.

Transformers 5 saves `CLIPTextModel` without the `text_model.` prefix (its modules sit at the top
level) but `CLIPTextModelWithProjection`, and the SD1.5/SDXL checkpoints on the Hub, with it; both
forms are read (a state dict with no `text_model.` key at all is taken as the bare form), and
errors name the keys as the checkpoint spells them. Export writes the prefixed form, which
Transformers 5 loads into either class.

`text_model.embeddings.position_ids` (a buffer some older checkpoints persist) is not a
parameter and is skipped.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tdm_jax.convert.errors import check_mapped_conversion, check_name_map
from tdm_jax.models.clip import CLIPTextEncoder, ClipConfig

# Buffers, not parameters: present in some checkpoints, never needed.
IGNORED_KEYS = ("text_model.embeddings.position_ids",)
PREFIX = "text_model."

Path = Tuple[str, ...]


def _name_map(config: ClipConfig) -> List[Tuple[Path, str, bool]]:
  """(our parameter path, Transformers name, whether it is a transposed Linear weight)."""
  entries: List[Tuple[Path, str, bool]] = [
      (("token_embedding", "embedding"), "text_model.embeddings.token_embedding.weight", False),
      (("position_embedding", "embedding"), "text_model.embeddings.position_embedding.weight", False),
  ]

  def linear(ours: Path, theirs: str, bias: bool = True):
    entries.append((ours + ("kernel",), theirs + ".weight", True))
    if bias:
      entries.append((ours + ("bias",), theirs + ".bias", False))

  def norm(ours: Path, theirs: str):
    entries.append((ours + ("scale",), theirs + ".weight", False))
    entries.append((ours + ("bias",), theirs + ".bias", False))

  for i in range(config.num_hidden_layers):
    ours, theirs = (f"layers_{i}",), f"text_model.encoder.layers.{i}"
    norm(ours + ("layer_norm1",), theirs + ".layer_norm1")
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
      linear(ours + ("self_attn", proj), f"{theirs}.self_attn.{proj}")
    norm(ours + ("layer_norm2",), theirs + ".layer_norm2")
    linear(ours + ("mlp", "fc1"), theirs + ".mlp.fc1")
    linear(ours + ("mlp", "fc2"), theirs + ".mlp.fc2")
  norm(("final_layer_norm",), "text_model.final_layer_norm")
  if config.with_projection:
    linear(("text_projection",), "text_projection", bias=False)
  return entries


def expected_shapes(config: ClipConfig, param_dtype: Any = jnp.float32) -> Dict[Path, jax.ShapeDtypeStruct]:
  """Flattened abstract parameter tree of `CLIPTextEncoder(config)` (no memory allocated)."""
  model = CLIPTextEncoder(config, param_dtype=param_dtype)
  ids = jnp.zeros((1, config.max_position_embeddings), jnp.int32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), ids))
  return flax.traverse_util.flatten_dict(nn.meta.unbox(variables["params"]))


def _checked_map(config: ClipConfig, expected: Mapping[Path, Any]) -> List[Tuple[Path, str, bool]]:
  return check_name_map("CLIP", _name_map(config), expected)


def _raise_if_problems(what: str, unused, unfilled, mismatched):
  check_mapped_conversion(what, unused, unfilled, mismatched,
                          hint="Check that the ClipConfig (layers, sizes, with_projection) matches the checkpoint's "
                               "config.json.")


def clip_params_from_state_dict(state_dict: Mapping[str, np.ndarray], config: ClipConfig,
                                param_dtype: Any = jnp.float32) -> Dict[str, Any]:
  """Transformers `CLIPTextModel(WithProjection)` state dict -> our `params` tree (numpy leaves).

  Shapes are reported in Transformers' layout (Linear weights as (out, in)).
  """
  expected = expected_shapes(config, param_dtype)
  entries = _checked_map(config, expected)
  # Canonical (prefixed) name -> the checkpoint's own spelling.
  bare = not any(k.startswith(PREFIX) for k in state_dict)
  spelling = {(PREFIX + k if bare and not k.startswith("text_projection.") else k): k for k in state_dict}
  known = {theirs for _, theirs, _ in entries}
  unused = sorted(orig for k, orig in spelling.items() if k not in known and k not in IGNORED_KEYS)
  unfilled, mismatched, flat = [], [], {}
  for ours, theirs, transpose in entries:
    if theirs not in spelling:
      unfilled.append(theirs[len(PREFIX):] if bare and theirs.startswith(PREFIX) else theirs)
      continue
    value = np.asarray(state_dict[spelling[theirs]])
    want = tuple(expected[ours].shape)
    want_theirs = want[::-1] if transpose else want
    if tuple(value.shape) != want_theirs:
      mismatched.append((spelling[theirs], want_theirs, tuple(value.shape)))
      continue
    if transpose:
      value = value.T
    flat[ours] = np.ascontiguousarray(value.astype(expected[ours].dtype))
  _raise_if_problems("state dict", unused, unfilled, mismatched)
  return flax.traverse_util.unflatten_dict(flat)


def clip_state_dict_from_params(params: Mapping[str, Any], config: ClipConfig,
                                prefix: bool = True) -> Dict[str, np.ndarray]:
  """Our `params` tree -> Transformers state dict (numpy, contiguous; for safetensors export).

  `prefix=False` drops `text_model.` (the form Transformers 5 itself saves `CLIPTextModel` in).
  """
  flat = flax.traverse_util.flatten_dict(nn.meta.unbox(dict(params)))
  expected = expected_shapes(config)
  entries = _checked_map(config, expected)
  unused = sorted("/".join(p) for p in flat if p not in expected)
  unfilled = sorted("/".join(p) for p in expected if p not in flat)
  mismatched = [("/".join(p), tuple(expected[p].shape), tuple(np.shape(flat[p])))
                for p in expected if p in flat and tuple(np.shape(flat[p])) != tuple(expected[p].shape)]
  _raise_if_problems("parameter tree", unused, unfilled, mismatched)
  out = {}
  for ours, theirs, transpose in entries:
    value = np.asarray(jax.device_get(flat[ours]))
    if not prefix and theirs.startswith(PREFIX):
      theirs = theirs[len(PREFIX):]
    out[theirs] = np.ascontiguousarray(value.T if transpose else value)
  return out
