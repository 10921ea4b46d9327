"""One report for every converter: which tensors and parameters did not meet, by name."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from tdm_jax.infra.errors import ConfigError


class ConversionError(ConfigError):
  """A checkpoint's tensors do not match the parameter tree its config describes."""


def check_conversion(what: str, *, unfilled: Sequence[str] = (), unused: Sequence[str] = (),
                     mismatched: Sequence[str] = (), hint: str = "") -> None:
  """Raises ConversionError listing every unfilled parameter, unused tensor and shape mismatch.

  mismatched: preformatted "name: expected (..), got (..)" lines, in the checkpoint's layout.
  """
  if not (unfilled or unused or mismatched):
    return
  lines = [f"{what} does not match the model its config describes:"]
  for title, names in ((f"{len(unfilled)} parameter(s) left unfilled (missing from the checkpoint):", unfilled),
                       (f"{len(unused)} checkpoint tensor(s) left unused:", unused),
                       (f"{len(mismatched)} shape mismatch(es) (name: expected, got):", mismatched)):
    if names:
      lines.append("  " + title)
      lines += [f"    {name}" for name in names]
  if hint:
    lines.append("  " + hint)
  raise ConversionError("\n".join(lines))


def check_name_map(model: str, entries, expected) -> list:
  """`entries` ((our path, checkpoint name, transposed) per parameter) if their paths are exactly the
  parameters of `expected`; otherwise an AssertionError: the map is out of step with the module, a bug
  in the converter, not in a checkpoint."""
  mapped = {e[0] for e in entries}
  if mapped != set(expected):
    raise AssertionError(f"{model} name map out of step with the module: unmapped {sorted(set(expected) - mapped)}, "
                         f"stale {sorted(mapped - set(expected))}")
  return entries


def check_mapped_conversion(what: str, unused, unfilled, mismatched, hint: str) -> None:
  """`check_conversion` with mismatches as (name, expected shape, found shape) triples."""
  check_conversion(what, unfilled=unfilled, unused=unused,
                   mismatched=[f"{n}: expected {e}, got {g}" for n, e, g in mismatched], hint=hint)


def check_params_match(what: str, flat: Mapping[tuple, Any], expected: Mapping[tuple, Any]) -> None:
  """Before an export: our flattened `params` hold exactly the leaves (and shapes) `expected` says the
  config has; else one error naming what is missing, extra and of the wrong shape."""
  shapes = {p: tuple(getattr(e, "shape", e)) for p, e in expected.items()}  # shapes or ShapeDtypeStructs
  missing = sorted("/".join(p) for p in shapes if p not in flat)
  extra = sorted("/".join(p) for p in flat if p not in shapes)
  wrong = sorted(f"{'/'.join(p)}: expected {shapes[p]}, got {tuple(np.shape(v))}"
                 for p, v in flat.items() if p in shapes and tuple(np.shape(v)) != shapes[p])
  if missing or extra or wrong:
    raise ConversionError(
        f"{what} params do not match the config:\n"
        + (f"  missing: {missing}\n" if missing else "") + (f"  extra: {extra}\n" if extra else "")
        + (f"  wrong shape: {wrong}\n" if wrong else ""))
