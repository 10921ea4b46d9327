"""The optimisers' learning-rate schedules: warm-up, cosine horizon, errors."""

import pytest

from tdm_jax import default_config
from tdm_jax.optim import make_optimizers


def _optim(**changes):
  config = default_config.get_config()
  config.optim.update(changes)
  return config.optim


def test_cosine_decays_over_the_run_or_over_decay_steps():
  _, _, student, fake = make_optimizers(_optim(), 500)
  assert float(student(50)) == pytest.approx(2e-5) and float(student(500)) == pytest.approx(0.0, abs=1e-12)
  assert float(fake(0)) == pytest.approx(1e-4) and float(fake(500)) == pytest.approx(1e-4)
  _, _, authors, _ = make_optimizers(_optim(decay_steps=10_001), 500)
  # The authors' horizon: near-constant over a 500-iteration run.
  assert float(authors(500)) == pytest.approx(2e-5, rel=0.01)
  assert float(authors(10_001)) == pytest.approx(0.0, abs=1e-12)


def test_negative_decay_steps_is_refused():
  with pytest.raises(ValueError, match="optim.decay_steps"):
    make_optimizers(_optim(decay_steps=-1), 500)
