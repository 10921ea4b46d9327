"""`pytest --compile-report`: where each test's seconds go, from JAX's own timers.

The suite's time is mostly JAX turning Python into programs, once per program. This plugin sums, per test
(setup, call and teardown together), the durations JAX reports through `jax.monitoring`: tracing to a
jaxpr, lowering to MLIR, XLA's backend compile, and loads from the persistent compilation cache. It
prints the tests with the most of it beside their wall time, so a change to the suite can aim at the
tracing, the compiling or the running. Work done in subprocesses (the CLI runs, the two-process job, the
notebook's kernel) is not seen. Off unless asked for; works under pytest-xdist (the workers send their
sums to the controller in each report's user_properties).
"""

import collections
import time

import pytest

# jax.monitoring duration events (named in jax/_src/dispatch.py and compiler.py), and this report's names.
EVENTS = {
    "/jax/core/compile/jaxpr_trace_duration": "trace",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
    "/jax/core/compile/backend_compile_duration": "compile",
    "/jax/compilation_cache/cache_retrieval_time_sec": "cache_load",
}
PROPERTY = "jax_seconds"
COLUMNS = ("wall", "trace", "lower", "compile", "cache_load")


def pytest_addoption(parser):
  parser.addoption("--compile-report", action="store", type=int, default=0, metavar="N",
                   help="print the N tests with the most JAX tracing, lowering and compiling time")


def pytest_configure(config):
  if config.getoption("compile_report"):
    config.pluginmanager.register(_Report(config.getoption("compile_report")), "compile_report_state")


class _Report:
  """One session's sums: per running test in this process, and per finished test where reports arrive
  (the controller under pytest-xdist)."""

  def __init__(self, n: int):
    import jax  # pylint: disable=g-import-not-at-top
    self.n, self.current, self.started, self.seen = n, collections.Counter(), 0.0, {}
    jax.monitoring.register_event_duration_secs_listener(self.listen)

  def listen(self, event, duration, **_):
    name = EVENTS.get(event)
    if name:
      self.current[name] += duration

  @pytest.hookimpl(tryfirst=True)
  def pytest_runtest_setup(self, item):
    del item
    self.current.clear()
    self.started = time.perf_counter()

  @pytest.hookimpl(hookwrapper=True)
  def pytest_runtest_makereport(self, item, call):
    if call.when == "teardown":
      item.user_properties.append((PROPERTY, dict(self.current, wall=time.perf_counter() - self.started)))
    yield

  def pytest_runtest_logreport(self, report):
    if report.when == "teardown":
      for key, value in report.user_properties:
        if key == PROPERTY:
          self.seen[report.nodeid] = value

  def pytest_terminal_summary(self, terminalreporter):
    if not self.seen:
      return
    total = collections.Counter()
    for value in self.seen.values():
      total.update(value)
    write = terminalreporter.write_line
    write(f"JAX seconds per test (in-process work only; {len(self.seen)} tests): " +
          ", ".join(f"{c} {total[c]:.0f}" for c in COLUMNS))
    write(" ".join(f"{c:>10}" for c in COLUMNS) + "  test")
    jax_time = lambda v: v.get("trace", 0) + v.get("lower", 0) + v.get("compile", 0)
    for nodeid, value in sorted(self.seen.items(), key=lambda kv: -jax_time(kv[1]))[:self.n]:
      write(" ".join(f"{value.get(c, 0.0):10.1f}" for c in COLUMNS) + "  " + nodeid)
