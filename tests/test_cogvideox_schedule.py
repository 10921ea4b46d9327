"""CogVideoX's DDIM schedule: our schedule and DDIM sampler equal Diffusers' `CogVideoXDDIMScheduler`.

CogVideoX divides the SNR of its scaled-linear alphabar by `snr_shift_scale` (3.0 for 2B, 1.0 for 5B), then
rescales it to zero terminal SNR; the networks predict v on "trailing" timesteps. The published scheduler
config is copied here (the project never reads the reference folder).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import CogVideoXDDIMScheduler

from tdm_jax.convert import student as student_io
from tdm_jax.core import sample, tdm
from tdm_jax.core.schedules import betas_from_config, from_diffusers_config
from tdm_jax.infra.errors import ConfigError

# THUDM/CogVideoX-2b scheduler/scheduler_config.json (5B: snr_shift_scale 1.0).
COGVIDEOX_2B = {"_class_name": "CogVideoXDDIMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                "beta_start": 0.00085, "clip_sample": False, "clip_sample_range": 1.0, "num_train_timesteps": 1000,
                "prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "sample_max_value": 1.0,
                "set_alpha_to_one": True, "snr_shift_scale": 3.0, "steps_offset": 0, "timestep_spacing": "trailing",
                "trained_betas": None}
SHIFTS = {"2B (shift 3)": 3.0, "5B (shift 1)": 1.0}


def _config(shift):
  return {**COGVIDEOX_2B, "snr_shift_scale": shift}


def _model(params, x_t, t, cond):
  """A stand-in v-predictor that depends on x_t, t and cond, the same in JAX and numpy."""
  xp = jnp if isinstance(x_t, jax.Array) else np
  t = xp.reshape(xp.asarray(t, xp.float32), (-1,) + (1,) * (x_t.ndim - 1))
  return params * xp.tanh(x_t) + cond * xp.cos(t / 300.0)


@pytest.mark.parametrize("shift", SHIFTS.values(), ids=SHIFTS.keys())
def test_alphas_cumprod_equal_diffusers(shift):
  ours = from_diffusers_config(_config(shift))
  ref = CogVideoXDDIMScheduler.from_config(_config(shift)).alphas_cumprod.numpy()
  np.testing.assert_array_equal(np.asarray(ours.alphas_cumprod), ref.astype(np.float32))
  assert ours.prediction_type == "v_prediction" and float(ours.alphas_cumprod[-1]) == 0.0  # zero terminal SNR
  # The betas an export writes rebuild the same alphabar.
  np.testing.assert_allclose(np.cumprod(1.0 - betas_from_config(_config(shift))), ref, rtol=1e-12, atol=1e-15)


def test_default_shift_is_diffusers_default():
  """A CogVideoX scheduler config without the key takes Diffusers' default 3.0; a plain DDIMScheduler never shifts."""
  no_key = {k: v for k, v in COGVIDEOX_2B.items() if k != "snr_shift_scale"}
  np.testing.assert_array_equal(from_diffusers_config(no_key).alphas_cumprod,
                                from_diffusers_config(COGVIDEOX_2B).alphas_cumprod)
  plain = from_diffusers_config({**no_key, "_class_name": "DDIMScheduler"})
  assert not np.allclose(plain.alphas_cumprod, from_diffusers_config(COGVIDEOX_2B).alphas_cumprod)
  with pytest.raises(ConfigError, match="snr_shift_scale"):
    from_diffusers_config({**COGVIDEOX_2B, "snr_shift_scale": 0.0})


@pytest.mark.parametrize("num_steps", [50, 4, 1])
@pytest.mark.parametrize("shift", SHIFTS.values(), ids=SHIFTS.keys())
def test_ddim_sampler_equals_stock_steps(shift, num_steps):
  """Our DDIM on the schedule ("trailing", clean estimate last) follows the stock scheduler's steps as
  CogVideoXPipeline takes them."""
  rng = np.random.default_rng(0)
  z = rng.standard_normal((2, 3, 4, 2, 2)).astype(np.float32)  # (batch, frames, channels, height, width)
  cond = rng.standard_normal((2, 1, 4, 1, 1)).astype(np.float32)
  params = np.float32(0.7)
  schedule = from_diffusers_config(_config(shift))
  ours = jax.jit(functools.partial(sample.teacher_sample, _model, num_steps=num_steps, guidance_scale=1.0,
                                   spacing="trailing"))(params, schedule, z, cond, None)
  stock = CogVideoXDDIMScheduler.from_config(_config(shift))
  stock.set_timesteps(num_steps)
  x = torch.from_numpy(z)
  for t in stock.timesteps:
    v = torch.from_numpy(_model(params, x.numpy(), np.full((2,), float(t)), cond))
    x = stock.step(v, t, x, return_dict=False)[0]
  np.testing.assert_allclose(np.asarray(ours), x.numpy(), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("total_steps", [1000, 900])
def test_exported_scheduler_gives_student_timesteps(total_steps):
  """An export keeps CogVideoX's scheduler class and its shift, so the stock set_timesteps(K) lands on the
  student's grid and alphabar is the teacher's (a shortened S writes the shifted betas, shift 1)."""
  exported = student_io.scheduler_config(COGVIDEOX_2B, total_steps)
  assert exported["_class_name"] == "CogVideoXDDIMScheduler"
  assert student_io.mismatched_counts(exported, total_steps, (1, 2, 4)) == []
  stock = CogVideoXDDIMScheduler.from_config(exported)
  teacher = CogVideoXDDIMScheduler.from_config(COGVIDEOX_2B)
  np.testing.assert_allclose(stock.alphas_cumprod.numpy(), teacher.alphas_cumprod.numpy()[:total_steps],
                             rtol=1e-6, atol=1e-7)
  for k in (1, 2, 4):
    stock.set_timesteps(k)
    np.testing.assert_array_equal(stock.timesteps.numpy(), tdm.student_timesteps(total_steps, k))


AUTHORS_GRID = (999, 856, 665, 399)  # the TDM authors' CogVideoX-2B LoRA


def test_student_timesteps_given_outright():
  """tdm.student_timesteps sets K = 4's grid (the traced grid of unified TDM agrees); other K keep the rule."""
  cfg = tdm.TDMConfig(total_steps=1000, step_choices=(1, 2, 4), student_timesteps=AUTHORS_GRID)
  schedule = cfg.student_schedule(from_diffusers_config(COGVIDEOX_2B))
  np.testing.assert_array_equal(tdm.student_timesteps(1000, 4, schedule), AUTHORS_GRID)
  np.testing.assert_array_equal(tdm.interval_lower_ends(1000, 4, schedule), [857, 666, 400, 0])
  np.testing.assert_array_equal(tdm.student_timesteps(1000, 2, schedule), [999, 499])
  for k in (1, 2, 4):
    taus, nxt, lows = jax.jit(lambda k: tdm.step_grid(1000, k, 4, schedule))(k)
    np.testing.assert_array_equal(taus[:k], tdm.student_timesteps(1000, k, schedule))
    np.testing.assert_array_equal(lows[:k], tdm.interval_lower_ends(1000, k, schedule))
    assert int(nxt[k - 1]) == -1
  # Draws stay inside the given intervals.
  seg = tdm.draw_segments(jax.random.PRNGKey(0), 256, 1000, 4, schedule=schedule)
  draws = tdm.draw_sample(jax.random.PRNGKey(1), cfg, seg, (256, 2))
  assert bool(jnp.all((draws.t >= jnp.maximum(cfg.min_timestep, seg.m_k)) & (draws.t < seg.t_k - cfg.upper_margin)))
  # A stock CogVideoX scheduler cannot be told these timesteps: the export says so, our sampler keeps them.
  exported = student_io.scheduler_config(COGVIDEOX_2B, 1000, schedule)
  assert student_io.mismatched_counts(exported, 1000, (1, 2, 4), schedule) == [4]


@pytest.mark.parametrize("grid, match", [((999, 856, 665), "3-step grid"), ((999, 665, 856, 399), "falling order"),
                                         ((1000, 856, 665, 399), r"\[0, tdm.total_steps=1000\)"),
                                         ((999, 856, 665, 25), "min_timestep")])
def test_bad_student_timesteps_are_refused(grid, match):
  with pytest.raises(ConfigError, match=match):
    tdm.TDMConfig(total_steps=1000, num_student_steps=4, student_timesteps=grid)


def test_student_timesteps_on_a_flow_teacher_are_refused():
  from tdm_jax.core.schedules import FlowSchedule  # pylint: disable=g-import-not-at-top
  with pytest.raises(ConfigError, match="tdm.student_shift"):
    tdm.TDMConfig(total_steps=1000, student_timesteps=AUTHORS_GRID).student_schedule(FlowSchedule(shift=3.0))
