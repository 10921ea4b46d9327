"""Matmul and convolution FLOPs of a compiled XLA program, loops counted as often as they run.

XLA's own cost analysis (`compiled.cost_analysis()["flops"]`) counts the body of a `while` loop once,
whatever its trip count: a `lax.scan` over K rollout steps, or blocked attention's scans over key
blocks, look like one step. This counter reads the optimised HLO text of the same program and
multiplies each loop body by its known trip count (XLA records it in the loop's backend config), each
fusion and call by one, and takes the largest branch of a conditional (a remat branch that always
runs, or a rollout slot that runs for the largest K). It counts what dominates diffusion models:
2 * (output elements) * (contraction size) per dot, 2 * (output elements) * (kernel elements per output
feature) per convolution. Elementwise work is left out (XLA's figure includes it, a few percent).
"""

from __future__ import annotations

import math
import re
from typing import Dict, List, Optional, Tuple

_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_ARRAY = re.compile(r"^([a-z0-9]+)\[([0-9,]*)\]")
_OPCODE = re.compile(r"^([\w\-]+)\((.*)$")


def _shape(text: str) -> Optional[Tuple[int, ...]]:
  m = _ARRAY.match(text)
  if not m:
    return None
  return tuple(int(d) for d in m.group(2).split(",") if d)


def _split_type(rest: str) -> Tuple[str, str]:
  """'f32[2,3]{1,0} dot(...)' -> ('f32[2,3]{1,0}', 'dot(...)'); tuple types are balanced on parentheses."""
  if rest.startswith("("):
    depth = 0
    for i, c in enumerate(rest):
      depth += c == "("
      depth -= c == ")"
      if depth == 0:
        return rest[:i + 1], rest[i + 1:].strip()
  head, _, tail = rest.partition(" ")
  return head, tail.strip()


def _operands(args: str) -> List[str]:
  """Names of the operands in 'a, b), attrs' (shapes, when printed before a name, skipped)."""
  depth, out, current = 0, [], ""
  for c in args:
    if c in "([{":
      depth += 1
    elif c in ")]}":
      if depth == 0:
        out.append(current)
        break
      depth -= 1
    if c == "," and depth == 0:
      out.append(current)
      current = ""
    else:
      current += c
  return [o.strip().split()[-1].lstrip("%") for o in out if o.strip()]


def _dims(attrs: str, name: str) -> Tuple[int, ...]:
  m = re.search(name + r"=\{([0-9,]*)\}", attrs)
  return tuple(int(d) for d in m.group(1).split(",") if d) if m else ()


class _Instruction:
  __slots__ = ("name", "shape", "opcode", "operands", "attrs")

  def __init__(self, name, shape, opcode, operands, attrs):
    self.name, self.shape, self.opcode, self.operands, self.attrs = name, shape, opcode, operands, attrs


def parse(hlo_text: str) -> Tuple[Dict[str, List[_Instruction]], Optional[str]]:
  """{computation name: instructions} and the entry computation's name."""
  computations, entry, current = {}, None, None
  for line in hlo_text.splitlines():
    m = _COMPUTATION.match(line.strip()) if not line.startswith(" ") else None
    if m:
      current = m.group(2)
      computations[current] = []
      if m.group(1):
        entry = current
      continue
    if current is None:
      continue
    if line.strip() == "}":
      current = None
      continue
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    type_text, rest = _split_type(m.group(3))
    op = _OPCODE.match(rest)
    if not op:
      continue
    computations[current].append(_Instruction(m.group(2), _shape(type_text), op.group(1), _operands(op.group(2)),
                                              op.group(2)))
  return computations, entry


def _dot_flops(ins: _Instruction, shapes: Dict[str, Tuple[int, ...]]) -> float:
  lhs = shapes.get(ins.operands[0])
  if ins.shape is None or lhs is None:
    return 0.0
  contracting = math.prod(lhs[d] for d in _dims(ins.attrs, "lhs_contracting_dims"))
  return 2.0 * math.prod(ins.shape) * contracting


def _conv_flops(ins: _Instruction, shapes: Dict[str, Tuple[int, ...]]) -> float:
  kernel = shapes.get(ins.operands[1]) if len(ins.operands) > 1 else None
  labels = re.search(r"dim_labels=\w+_(\w+)->", ins.attrs)
  if ins.shape is None or kernel is None or labels is None:
    return 0.0
  out_features = kernel[labels.group(1).index("o")]
  return 2.0 * math.prod(ins.shape) * math.prod(kernel) / max(out_features, 1)


def _called(attrs: str, key: str) -> List[str]:
  m = re.search(key + r"=\{([^}]*)\}", attrs)
  if m:
    return [c.strip().lstrip("%") for c in m.group(1).split(",") if c.strip()]
  m = re.search(key + r"=%?([\w.\-]+)", attrs)
  return [m.group(1)] if m else []


def _trip_count(attrs: str) -> Optional[int]:
  m = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', attrs)
  return int(m.group(1)) if m else None


def count(hlo_text: str) -> Dict[str, float]:
  """{"flops": matmul + conv FLOPs of the program, "unknown_trip_loops": loops counted once for want of a
  known trip count} for the optimised HLO text of one program (`compiled.as_text()`)."""
  computations, entry = parse(hlo_text)
  memo: Dict[str, float] = {}
  unknown = [0]

  def flops(name: str) -> float:
    if name in memo:
      return memo[name]
    memo[name] = 0.0  # guards against cycles, which HLO does not have
    instructions = computations.get(name, [])
    shapes = {i.name: i.shape for i in instructions if i.shape is not None}
    total = 0.0
    for ins in instructions:
      if ins.opcode == "dot":
        total += _dot_flops(ins, shapes)
      elif ins.opcode == "convolution":
        total += _conv_flops(ins, shapes)
      elif ins.opcode == "while":
        trips = _trip_count(ins.attrs)
        if trips is None:
          unknown[0] += 1
        total += (trips or 1) * sum(flops(c) for c in _called(ins.attrs, "body"))
      elif ins.opcode == "conditional":
        branches = (_called(ins.attrs, "branch_computations")
                    or _called(ins.attrs, "true_computation") + _called(ins.attrs, "false_computation"))
        total += max((flops(c) for c in branches), default=0.0)
      else:
        for key in ("calls", "to_apply", "called_computations"):
          if ins.opcode in ("reduce", "reduce-window", "scatter", "sort", "map", "select-and-scatter", "all-reduce",
                            "reduce-scatter"):
            break  # their computations are scalar combiners
          total += sum(flops(c) for c in _called(ins.attrs, key))
    memo[name] = total
    return total

  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  return {"flops": flops(entry), "unknown_trip_loops": float(unknown[0])}


def compiled_flops(compiled) -> Dict[str, float]:
  """For a `jax.stages.Compiled`: our loop-aware count, and XLA's cost-analysis figure (loops counted once)."""
  out = count(compiled.as_text())
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  out["xla_flops"] = float((analysis or {}).get("flops", float("nan")))
  return out
