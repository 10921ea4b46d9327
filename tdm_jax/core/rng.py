"""Every random draw is a function of (seed, iteration, role).

A resumed run must repeat the draws of an uninterrupted one, so no key is ever carried
from one iteration to the next: each is derived afresh with `fold_in`.
"""

import enum

import jax


class Role(enum.IntEnum):
  """What a key is for; folded in last so that roles never share a stream."""
  STUDENT_NOISE = 1  # z ~ N(0, I), the start of the student's rollout
  FAKE_SAMPLE = 2  # the step-aware sample of the fake-score loss
  GENERATOR_SAMPLE = 3  # the fresh step-aware sample of the generator loss
  STEP_COUNT = 4  # which K an iteration trains ("unified" step conditioning)
  DATA = 5  # the conditioning batch (labels, prompt indices)
  CFG_DROPOUT = 6  # caption dropout while pretraining a teacher
  DIFFUSION_NOISE = 7  # noise and timesteps of the denoising objective
  INIT = 8  # parameter initialisation
  EVAL = 9  # evaluation noise


def iteration_key(seed: int, step) -> jax.Array:
  """The key of iteration `step` (an int or a traced integer scalar)."""
  return jax.random.fold_in(jax.random.key(seed), step)


def role_key(key: jax.Array, role: Role) -> jax.Array:
  return jax.random.fold_in(key, int(role))


def derive(seed: int, step, role: Role) -> jax.Array:
  """The key for `role` at iteration `step` of a run seeded with `seed`."""
  return role_key(iteration_key(seed, step), role)
