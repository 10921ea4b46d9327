"""XLA flags for the test processes: the fake CPU device count, plus a faster-compiling XLA:CPU.

The suite is dominated by compiling many small programs once each on 2 cores, not by running them:
LLVM's optimisation level 0 compiles them about a quarter faster (the UNet remat test: 72 s -> 52 s)
and computes the same functions (no fast-math either way). XLA:CPU's older loop emitters for fusions
(`xla_cpu_use_fusion_emitters=false`) compile a quarter faster again than the MLIR ones (the remat test:
85 -> 62 s of CPU) and run about as fast (the toy claim's 600 iterations: 116 -> 124 s of CPU).
The tests' subprocesses take these too.
Users' runs keep XLA's defaults; benchmarks never import this.
"""

FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a test process with `devices` CPU devices."""
  return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"
