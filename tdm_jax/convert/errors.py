"""One report for every converter: which tensors and parameters did not meet, by name."""

from __future__ import annotations

from typing import Sequence

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
