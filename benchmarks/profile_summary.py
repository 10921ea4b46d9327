"""Where the time of a profiled run goes: a `train.profile_steps` trace grouped by kind of operation.

  python -m tdm_jax.main --config=configs/shapes.py --workdir=/tmp/prof \
      --config.train.num_iterations=8 --config.train.profile_steps="(4,3)" \
      --config.train.evaluate_after=False --config.train.export_after=False
  python benchmarks/profile_summary.py /tmp/prof/profile

Reads the newest `perfetto_trace.json.gz` under the folder (jax.profiler writes it with
`create_perfetto_trace=True`) and prints, per thread group, the busy time of each kind of event (an
HLO name without its numeric suffix: `ynn_fusion` = XNNPACK matmul/conv fusions on CPU, `loop_fusion`
= elementwise, `while` = loop bodies, counted inside their ops too) and the longest single events.
Host-side events (the Python thread: dispatch, transfers) are listed apart from device work.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import sys


def load(folder: str):
  paths = sorted(glob.glob(os.path.join(folder, "**", "perfetto_trace.json.gz"), recursive=True), key=os.path.getmtime)
  if not paths:
    raise SystemExit(f"no perfetto_trace.json.gz under {folder}; run with --config.train.profile_steps=(FIRST,COUNT)")
  with gzip.open(paths[-1]) as f:
    data = json.load(f)
  return paths[-1], data["traceEvents"] if isinstance(data, dict) else data


def summarize(events, top: int = 15) -> str:
  threads = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  group_of = lambda name: re.sub(r"/-?\d+$", "", name)
  kinds = collections.defaultdict(collections.Counter)
  counts = collections.defaultdict(collections.Counter)
  single = []
  span = [float("inf"), 0.0]
  for e in events:
    if e.get("ph") != "X":
      continue
    group = group_of(threads.get((e["pid"], e.get("tid")), "?"))
    kind = re.sub(r"\.\d+$", "", e["name"])
    dur = float(e.get("dur", 0.0))
    kinds[group][kind] += dur
    counts[group][kind] += 1
    single.append((dur, group, e["name"]))
    span = [min(span[0], e["ts"]), max(span[1], e["ts"] + dur)]
  lines = [f"trace span {(span[1] - span[0]) / 1000:.1f} ms"]
  for group, counter in sorted(kinds.items(), key=lambda kv: -sum(kv[1].values())):
    lines.append(f"\n[{group}] (threads of this kind summed)")
    for kind, dur in counter.most_common(top):
      lines.append(f"  {dur / 1000:10.1f} ms  {counts[group][kind]:6d} x  {kind}")
  lines.append("\nlongest single events:")
  for dur, group, name in sorted(single, reverse=True)[:top]:
    lines.append(f"  {dur / 1000:10.1f} ms  {group}: {name}")
  return "\n".join(lines)


def main(argv):
  if len(argv) != 2:
    raise SystemExit(__doc__)
  path, events = load(argv[1])
  print(path)
  print(summarize(events))


if __name__ == "__main__":
  main(sys.argv)
