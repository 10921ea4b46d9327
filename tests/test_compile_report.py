"""`pytest --compile-report=N` (tests/compile_report.py): per-test JAX seconds reach the summary."""

pytest_plugins = ("pytester",)


def test_compile_report_names_the_tests_that_compiled(pytester):
  pytester.makepyfile(test_inner="""
import jax
import jax.numpy as jnp

def test_compiles():
  jax.jit(lambda x: jnp.sin(x) * 2.0 + x)(jnp.arange(3.0)).block_until_ready()

def test_does_nothing():
  pass
""")
  result = pytester.runpytest_inprocess("-p", "compile_report", "--compile-report=5", "-p", "no:cacheprovider")
  result.assert_outcomes(passed=2)
  lines = result.outlines
  summary = next(i for i, line in enumerate(lines) if line.startswith("JAX seconds per test"))
  assert "2 tests" in lines[summary]
  rows = [line.split() for line in lines[summary + 2:summary + 4]]
  assert rows[0][-1].endswith("test_compiles") and rows[1][-1].endswith("test_does_nothing")
  wall, trace, lower, compile_, _ = map(float, rows[0][:5])
  assert trace + lower + compile_ > 0 and wall >= compile_
  assert float(rows[1][3]) == 0.0  # nothing compiled in the empty test


def test_no_report_unless_asked(pytester):
  pytester.makepyfile(test_inner="def test_ok():\n  pass\n")
  result = pytester.runpytest_inprocess("-p", "compile_report", "-p", "no:cacheprovider")
  result.assert_outcomes(passed=1)
  assert not any(line.startswith("JAX seconds per test") for line in result.outlines)
