"""What is live at the peak of a compiled step, from XLA's own dump, grouped so that CPU-only buffers show.

  XLA_FLAGS="--xla_force_host_platform_device_count=1 --xla_dump_to=/tmp/step_dump \\
      --xla_dump_hlo_module_re=.*train_step.*" \\
      python benchmarks/memory.py --devices=1 --mesh=1,1,1 --resolution=1024 --batch_size=8
  python benchmarks/peak_breakdown.py /tmp/step_dump

XLA writes, per compiled module, the buffers live at the peak of its schedule
(`*-live-range.txt`, "Live ranges at N (peak)") and the optimised program (`*after_optimizations.txt`).
This script sums the peak's buffers into groups:

- arguments: the step's parameters (weights, state, batch);
- from frozen weights alone: entry-computation buffers computed from nothing but frozen weights
  (the teacher's / text encoders' parameters) and constants. On CPU these are XLA:CPU's float32
  copies of bf16 weights (it has no bf16 matmul or convolution) and norm scales broadcast to
  activation size for its fused kernels; a GPU or TPU program computes on the bf16 weights and fuses
  the broadcasts, so it holds none of them;
- in sub-computations: the working set of the computation running at the peak (for the
  rematerialised UNet blocks, one block's backward);
- other entry buffers: activations and everything else of the step itself.

Prints GiB per group and the largest buffers of each.
"""

from __future__ import annotations

import collections
import glob
import os
import re
import sys

GIB = 2 ** 30
_FROZEN_PREFIXES = ("teacher_params", "conditioner")


def _one(pattern: str) -> str:
  found = sorted(glob.glob(pattern))
  if not found:
    raise SystemExit(f"no file matches {pattern}: run the step with XLA_FLAGS=--xla_dump_to=DIR "
                     f"--xla_dump_hlo_module_re=.*train_step.* first (see this script's docstring)")
  return max(found, key=os.path.getsize)  # the step, not a small helper module of the same name


def peak_buffers(live_range_file: str) -> dict:
  """{buffer name: bytes} of the buffers live at the schedule's peak."""
  out, inside = {}, False
  with open(live_range_file) as f:
    for line in f:
      if re.match(r"\s+Live ranges at \d+ \(peak\):", line):
        inside = True
        continue
      if inside:
        m = re.match(r"\s+(\S+?)(\{[^}]*\})?: (\d+) bytes", line)
        if not m:
          break
        out[m.group(1)] = out.get(m.group(1), 0) + int(m.group(3))
  if not out:
    raise SystemExit(f"{live_range_file} has no 'Live ranges at N (peak)' section")
  return out


def entry_graph(hlo_file: str):
  """(parameter names, {instruction: operand names}) of the ENTRY computation."""
  params, operands = set(), {}
  with open(hlo_file) as f:
    text = f.read()
  start = text.index("\nENTRY ")
  entry = text[start:text.index("\n}\n", start)]
  for line in entry.split("\n"):
    m = re.match(r"\s+(?:ROOT )?%(\S+) = .*?\b([\w-]+)\((.*?)\)(?:, |$)", line)
    if not m:
      continue
    name, op, args = m.groups()
    if op == "parameter":
      params.add(name)
    operands[name] = re.findall(r"%([\w.\-]+)", args)
  return params, operands


def frozen_derived(params, operands) -> set:
  """Entry instructions computed from frozen-weight parameters and constants only."""
  frozen = {p for p in params if p.startswith(_FROZEN_PREFIXES)}
  derived = set(frozen)
  changed = True
  while changed:
    changed = False
    for name, args in operands.items():
      if name in derived or name in params or not args:
        continue
      if all(a in derived or (a not in params and a in operands and not operands[a]) for a in args):
        derived.add(name)
        changed = True
  return derived - frozen


def main(argv):
  if len(argv) != 2:
    raise SystemExit(__doc__)
  folder = argv[1]
  live = peak_buffers(_one(os.path.join(folder, "*train_step*after_optimizations-live-range.txt")))
  params, operands = entry_graph(_one(os.path.join(folder, "*train_step*after_optimizations.txt")))
  derived = frozen_derived(params, operands)
  groups = collections.defaultdict(list)
  for name, size in live.items():
    if name in params:
      group = "arguments"
    elif name in derived:
      group = "from frozen weights alone (CPU-only)"
    elif name in operands:
      group = "other entry buffers (the step's activations)"
    else:
      group = "in sub-computations (one rematerialised block's backward)"
    groups[group].append((size, name))
  print(f"live at the peak: {sum(live.values()) / GIB:.2f} GiB")
  for group, items in sorted(groups.items(), key=lambda kv: -sum(s for s, _ in kv[1])):
    items.sort(reverse=True)
    print(f"  {sum(s for s, _ in items) / GIB:7.2f} GiB  {group} ({len(items)} buffers)")
    for size, name in items[:4]:
      print(f"  {'':9} {size / 2 ** 20:9.1f} MiB  {name}")


if __name__ == "__main__":
  main(sys.argv)
