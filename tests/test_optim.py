"""The optimisers' learning-rate schedules: warm-up, cosine horizon, errors."""

import jax
import numpy as np
import pytest

from tdm_jax import default_config
from tdm_jax.core.optim import make_optimizers


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


def test_lr_scales_multiply_the_updates_of_matching_leaves_only():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  params = {"class_embedding": {"embedding": jnp.zeros((3, 4))}, "conv_in": {"kernel": jnp.zeros((2, 2))}}
  grads = jax.tree.map(jnp.ones_like, params)
  _, plain, _, _ = make_optimizers(_optim(), 500)  # the fake score's: constant lr from step 0
  _, scaled, _, _ = make_optimizers(_optim(lr_scales=((r"^class_embedding/", 50.0),)), 500)
  step = lambda tx: tx.update(grads, tx.init(params), params)[0]
  a, b = step(plain), step(scaled)
  np.testing.assert_allclose(b["class_embedding"]["embedding"], 50.0 * a["class_embedding"]["embedding"], rtol=1e-6)
  np.testing.assert_array_equal(b["conv_in"]["kernel"], a["conv_in"]["kernel"])
  assert float(jnp.abs(a["conv_in"]["kernel"]).max()) > 0


@pytest.mark.parametrize("scales, message", [
    (((r"class(", 2.0),), "not a valid regex"),
    (((r"class", 0.0),), "must be positive"),
    (((r"class",),), "must be a pair"),
])
def test_bad_lr_scales_are_named(scales, message):
  with pytest.raises(ValueError, match=message):
    make_optimizers(_optim(lr_scales=scales), 500)
