"""Diffusers' dotted parameter names <-> our parameter paths, shared by the model converters.

Our Flax modules take Diffusers' module names with a list index joined to the name before it:
Diffusers' `down_blocks.1.attentions.0.to_out.0.weight` is our path `("down_blocks_1", "attentions_0",
"to_out_0", <leaf>)`. Which names are lists differs per model, hence the `lists` argument.
"""

from __future__ import annotations

import re
from typing import Dict, Sequence, Tuple

import flax

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
