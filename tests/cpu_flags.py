"""XLA flags for the test processes: the fake CPU device count, plus a faster-compiling XLA:CPU.

The suite is dominated by compiling many small programs once each on 2 cores, not by running them:
LLVM's optimisation level 0 compiles them about a quarter faster (the UNet remat test: 72 s -> 52 s)
and computes the same functions (no fast-math either way). The tests' subprocesses take these too.
Users' runs keep XLA's defaults; benchmarks never import this.
"""

FAST_COMPILE = "--xla_backend_optimization_level=0"


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a test process with `devices` CPU devices."""
  return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"
