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

# jax.monitoring duration events (jax/_src/dispatch.py, pxla.py, compiler.py), and this report's names.
EVENTS = {
    "/jax/core/compile/jaxpr_trace_duration": "trace",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
    "/jax/core/compile/backend_compile_duration": "compile",
    "/jax/compilation_cache/cache_retrieval_time_sec": "cache_load",
}
PROPERTY = "jax_seconds"
_current = collections.Counter()  # this process's sums for the running test
_started = [0.0]
_seen = {}  # nodeid -> sums, where reports arrive (the controller under pytest-xdist)


def pytest_addoption(parser):
  parser.addoption("--compile-report", action="store", type=int, default=0, metavar="N",
                   help="print the N tests with the most JAX tracing, lowering and compiling time")


def _listen(event, duration, **_):
  name = EVENTS.get(event)
  if name:
    _current[name] += duration


def pytest_configure(config):
  if config.getoption("compile_report"):
    import jax  # pylint: disable=g-import-not-at-top
    jax.monitoring.register_event_duration_secs_listener(_listen)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
  if item.config.getoption("compile_report"):
    _current.clear()
    _started[0] = time.perf_counter()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  if call.when == "teardown" and item.config.getoption("compile_report"):
    item.user_properties.append((PROPERTY, dict(_current, wall=time.perf_counter() - _started[0])))
  yield


def pytest_runtest_logreport(report):
  if report.when == "teardown":
    for key, value in report.user_properties:
      if key == PROPERTY:
        _seen[report.nodeid] = value


def pytest_terminal_summary(terminalreporter, config):
  n = config.getoption("compile_report")
  if not n or not _seen:
    return
  columns = ("wall", "trace", "lower", "compile", "cache_load")
  total = collections.Counter()
  for value in _seen.values():
    total.update(value)
  write = terminalreporter.write_line
  write(f"JAX seconds per test (in-process work only; {len(_seen)} tests): " +
        ", ".join(f"{c} {total[c]:.0f}" for c in columns))
  write(" ".join(f"{c:>10}" for c in columns) + "  test")
  jax_time = lambda v: v.get("trace", 0) + v.get("lower", 0) + v.get("compile", 0)
  for nodeid, value in sorted(_seen.items(), key=lambda kv: -jax_time(kv[1]))[:n]:
    write(" ".join(f"{value.get(c, 0.0):10.1f}" for c in columns) + "  " + nodeid)
