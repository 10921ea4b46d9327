"""Diffusers' dotted parameter names <-> our parameter paths, shared by the model converters.

Our Flax modules take Diffusers' module names with a list index joined to the name before it:
Diffusers' `down_blocks.1.attentions.0.to_out.0.weight` is our path `("down_blocks_1", "attentions_0",
"to_out_0", <leaf>)`. Which names are lists differs per model, hence the `lists` argument.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Dict, Mapping, Sequence, Tuple

import flax
import jax
import numpy as np

from tdm_jax.convert.errors import check_conversion, check_params_match

Path = Tuple[str, ...]


def split_indices(name: str) -> Path:
  """'down_blocks.0.resnets.1.norm1.weight' -> ('down_blocks_0', 'resnets_1', 'norm1', 'weight')."""
  parts = []
  for part in name.split("."):
    if part.isdigit() and parts:
      parts[-1] = f"{parts[-1]}_{part}"
    else:
      parts.append(part)
  return tuple(parts)


def list_pattern(lists: Sequence[str]) -> "re.Pattern":
  """The pattern of our path parts that are Diffusers list items (`resnets_1` for lists=("resnets",))."""
  return re.compile(r"^(%s)_(\d+)$" % "|".join(lists))


def join_indices(path: Path, pattern: "re.Pattern") -> str:
  """('down_blocks_0', 'resnets_1', 'weight') -> 'down_blocks.0.resnets.1.weight', for parts `pattern` matches."""
  parts = []
  for part in path:
    m = pattern.match(part)
    parts.append(f"{m.group(1)}.{m.group(2)}" if m else part)
  return ".".join(parts)


def flat_shapes(abstract_params) -> Dict[Path, Tuple[int, ...]]:
  """{path: shape} of a (boxed) abstract parameter tree."""
  params = flax.core.meta.unbox(abstract_params)
  return {path: tuple(leaf.shape) for path, leaf in flax.traverse_util.flatten_dict(params).items()}


def kernel_axes(path: Path, ndim: int, to_ours: bool) -> Tuple[int, ...]:
  """The transpose from Diffusers' layout of a tensor to ours (or back): Dense kernels (out, in) <-> (in,
  out), 2-D conv kernels OIHW <-> HWIO, everything else as it is."""
  if path[-1] == "kernel" and ndim == 2:
    return (1, 0)
  if path[-1] == "kernel" and ndim == 4:
    return (2, 3, 1, 0) if to_ours else (3, 2, 0, 1)
  return tuple(range(ndim))


def tree_from_state_dict(state_dict: Mapping[str, np.ndarray], expected: Mapping[Path, Tuple[int, ...]],
                         our_path: Callable[[str], Path], diffusers_name: Callable[[Path], str], what: str,
                         mismatched: Sequence[str] = ()) -> Dict[str, Any]:
  """A Diffusers state dict (name -> array) as our parameter tree of `expected` {path: shape}, kernels
  transposed (`kernel_axes`), arrays in the checkpoint's dtype. Raises ConversionError naming every unused
  tensor, unfilled parameter and shape mismatch of `what` (plus `mismatched` lines the caller found)."""
  filled: Dict[Path, np.ndarray] = {}
  unused, mismatched = [], list(mismatched)
  for name in sorted(state_dict):
    path = our_path(name)
    if path not in expected:
      unused.append(name)
      continue
    value = np.asarray(state_dict[name])
    axes = kernel_axes(path, value.ndim, to_ours=False)
    want = tuple(expected[path][i] for i in axes) if len(axes) == len(expected[path]) else None
    if want is None or tuple(value.shape) != want:
      want = want or tuple(expected[path])
      mismatched.append(f"{name}: expected {want}, got {tuple(value.shape)}")
      continue
    filled[path] = np.transpose(value, kernel_axes(path, value.ndim, to_ours=True))
  mismatched_names = {m.split(":")[0] for m in mismatched}
  unfilled = sorted(n for n in (diffusers_name(p) for p in expected if p not in filled) if n not in mismatched_names)
  check_conversion(what, unfilled=unfilled, unused=unused, mismatched=mismatched,
                   hint="Check that config.json belongs to these weights.")
  return flax.traverse_util.unflatten_dict(filled)


def state_dict_from_tree(flat: Mapping[Path, Any], expected: Mapping[Path, Tuple[int, ...]],
                         diffusers_name: Callable[[Path], str], what: str) -> Dict[str, np.ndarray]:
  """Our flat parameter tree, checked against `expected`, as a Diffusers state dict (kernels transposed back)."""
  check_params_match(what, flat, expected)
  out = {}
  for path, value in flat.items():
    value = np.asarray(jax.device_get(value))
    out[diffusers_name(path)] = np.transpose(value, kernel_axes(path, value.ndim, to_ours=False))
  return out
