"""TDM in rectified-flow form (TDM.md, "The same method on other teachers"): the flow schedule against
Diffusers' FlowMatchEulerDiscreteScheduler, the student's grid and draws in flow time, the transition's
marginals, the generator's gradient, the samplers, and the scheduler configs we refuse.

The tiny pure-jnp model of test_tdm.py serves as a velocity predictor (its time embedding reads t / 1000,
which works for float t as for integers).
"""

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tdm_jax.core import rng, sample, tdm
from tdm_jax.core import schedules as S
from tdm_jax.infra.errors import ConfigError

sys.path.insert(0, os.path.dirname(__file__))
from test_tdm import (apply, init_params, jit, make_cond, max_abs, normal, perturb,  # pylint: disable=wrong-import-position
                      recording_tx, strict_apply, student_net)

SD3 = S.FlowSchedule(shift=3.0)


def diffusers_scheduler(**kw):
  from diffusers import FlowMatchEulerDiscreteScheduler  # pylint: disable=g-import-not-at-top
  return FlowMatchEulerDiscreteScheduler(**kw)


def config_of(scheduler) -> dict:
  """The scheduler's config as its scheduler_config.json holds it (with the class name)."""
  return {"_class_name": type(scheduler).__name__, **scheduler.config}


# ----------------------------------------------------------------------------- the schedule itself

@pytest.mark.parametrize("config,seq_len", [
    (dict(shift=3.0), None),
    (dict(shift=1.0), None),
    (dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15), 1024),
    (dict(use_dynamic_shifting=True, time_shift_type="linear", base_shift=0.5, max_shift=1.15), 4096),
])
def test_sampling_sigmas_equal_diffusers(config, seq_len):
  from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift  # pylint: disable=g-import-not-at-top
  theirs = diffusers_scheduler(**config)
  ours = S.from_diffusers_config(config_of(theirs), image_seq_len=seq_len)
  assert isinstance(ours, S.FlowSchedule) and ours.continuous
  mu = None
  if config.get("use_dynamic_shifting"):
    c = theirs.config
    mu = calculate_shift(seq_len, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    assert ours.mu == pytest.approx(mu, rel=1e-12)
  for k in (1, 2, 4, 28):
    theirs.set_timesteps(k, mu=mu)
    sigmas = S.flow_sampling_sigmas(ours, k)
    np.testing.assert_array_equal(sigmas, theirs.sigmas.numpy()[:-1])
    np.testing.assert_allclose(1000 * sigmas, theirs.timesteps.numpy(), rtol=1e-7)


def test_conversions_and_forward_process():
  x0, eps = normal(1, (4, 2, 3, 3)), normal(2, (4, 2, 3, 3))
  t = jnp.asarray([1000.0, 731.25, 250.0, 3.5])
  sig = np.asarray(t) / 1000
  x_t = SD3.add_noise(x0, eps, t)
  np.testing.assert_allclose(np.asarray(x_t), (1 - sig[:, None, None, None]) * np.asarray(x0)
                             + sig[:, None, None, None] * np.asarray(eps), rtol=1e-6, atol=1e-6)
  v = SD3.from_x0_eps(x0, eps, t)
  np.testing.assert_array_equal(np.asarray(v), np.asarray(eps - x0))
  x0_back, eps_back = SD3.to_x0_eps(v, x_t, t)
  np.testing.assert_allclose(np.asarray(x0_back), np.asarray(x0), atol=2e-6)
  np.testing.assert_allclose(np.asarray(eps_back), np.asarray(eps), atol=2e-6)
  # a = 1 - sigma, s = sigma; -1 is clean data; the snr behind min-SNR.
  np.testing.assert_allclose(np.asarray(SD3.a(t)), 1 - sig, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(SD3.s(t)), sig, rtol=1e-6)
  assert float(SD3.s(-1)) == 0.0 and float(SD3.a(-1)) == 1.0
  np.testing.assert_allclose(np.asarray(SD3.snr(t)), ((1 - sig) / sig) ** 2, rtol=1e-5)
  # The DDIM move between sigmas is the Euler step x + (sigma_next - sigma) v.
  x0_p, eps_p = SD3.to_x0_eps(v, x_t, t)
  t_next = jnp.asarray([750.0, 500.0, 0.0, -1.0])
  euler = np.asarray(x_t) + (np.maximum(np.asarray(t_next), 0) / 1000 - sig)[:, None, None, None] * np.asarray(v)
  np.testing.assert_allclose(np.asarray(S.ddim_step(SD3, x0_p, eps_p, t_next)), euler, atol=3e-6)


@pytest.mark.parametrize("random_mid", [False, True])
def test_transition_keeps_the_flow_marginals(random_mid):
  """x_m on the student's flow at m, moved to t with fresh noise: x_t = (1 - sigma_t) x0 + sigma_t e with
  e ~ N(0, I) when eps_s is, i.e. mean (1 - sigma_t) x0 and variance sigma_t^2 (TDM.md, what must hold)."""
  m = jnp.asarray([0.0, 120.5, 500.0, 899.0, 500.0])
  t = jnp.asarray([30.0, 400.0, 749.9, 990.0, 500.0])  # the last: t == m, the identity
  ratio, b = S.diffusion_coefficients(SD3, m, t)
  sig_m, sig_t = np.asarray(m) / 1000, np.asarray(t) / 1000
  np.testing.assert_allclose(np.asarray(ratio), (1 - sig_t) / (1 - sig_m), rtol=2e-5)
  np.testing.assert_allclose(np.asarray(ratio) ** 2 * sig_m**2 + np.asarray(b) ** 2, sig_t**2, rtol=1e-5, atol=1e-7)
  assert float(ratio[-1]) == 1.0 and float(b[-1]) == 0.0

  n_draws, d = 20000, 6
  x0 = np.tile(np.linspace(-1.5, 1.5, d, dtype=np.float32), (n_draws, 1))
  cfg = tdm.TDMConfig(random_mid=random_mid)
  seg = tdm.Segments(j=jnp.zeros(n_draws, jnp.int32), k=jnp.ones(n_draws, jnp.int32),
                     t_k=jnp.full((n_draws,), 900.0), m_k=jnp.full((n_draws,), 750.0))
  eps_s = normal(3, (n_draws, d))
  sample_ = jax.jit(lambda key: tdm.noisy_sample(key, SD3, cfg, jnp.asarray(x0), eps_s, seg))(jax.random.key(4))
  x_t, t_draw = np.asarray(sample_.x_t), np.asarray(sample_.t)
  sig = t_draw[:, None] / 1000
  assert np.all((t_draw >= 750) & (t_draw < 890)) and len(np.unique(t_draw)) > n_draws // 2  # floats, not ints
  if random_mid:
    m_draw = np.asarray(sample_.m)
    assert np.all((m_draw >= 750) & (m_draw < 880) & (t_draw >= m_draw))
  e = np.asarray(sample_.effective_noise)
  np.testing.assert_allclose(x_t, (1 - sig) * x0 + sig * e, atol=3e-5)
  z = (x_t - (1 - sig) * x0) / sig  # standardised: N(0, 1) in every coordinate
  np.testing.assert_allclose(z.mean(0), 0.0, atol=0.03)
  np.testing.assert_allclose(z.std(0), 1.0, atol=0.02)


# ----------------------------------------------------------------------------- the student's grid

def test_student_grid_in_flow_time():
  np.testing.assert_allclose(tdm.student_timesteps(800, 4, SD3), [1000, 900, 750, 500], rtol=1e-6)
  np.testing.assert_allclose(tdm.interval_lower_ends(800, 4, SD3), [900, 750, 500, 0], rtol=1e-6)
  np.testing.assert_allclose(tdm.student_timesteps(800, 2, SD3), [1000, 750], rtol=1e-6)
  np.testing.assert_allclose(tdm.student_timesteps(800, 1, SD3), [1000])
  own = S.FlowSchedule(shift=3.0, student_shift=1.0)  # the student's own warp
  np.testing.assert_allclose(tdm.student_timesteps(800, 4, own), [1000, 750, 500, 250], rtol=1e-6)
  for k in (1, 2, 4):
    taus, nxt, lows = jax.jit(lambda kk: tdm.step_grid(800, kk, 4, SD3))(jnp.int32(k))
    np.testing.assert_allclose(np.asarray(taus)[:k], tdm.student_timesteps(800, k, SD3), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(lows)[:k], tdm.interval_lower_ends(800, k, SD3), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(nxt)[:k], np.append(tdm.student_timesteps(800, k, SD3)[1:], -1), rtol=1e-6)
    assert np.all(np.isfinite(np.asarray(taus)))  # slots past K stay finite


@pytest.mark.parametrize("mode", ["separate", "shared"])
def test_draws_respect_the_flow_intervals(mode):
  cfg = tdm.TDMConfig(interval_mode=mode)
  draws = jax.jit(lambda key: tdm.iteration_draws(cfg, key, 4096, (2,), schedule=SD3))(rng.iteration_key(0, 1))
  for seg, smp in ((draws.fake_segments, draws.fake_sample), (draws.generator_segments, draws.generator_sample)):
    t_k, m_k, t = (np.asarray(v) for v in (seg.t_k, seg.m_k, smp.t))
    assert t.dtype == np.float32 and set(np.round(np.unique(t_k), 3)) == {1000.0, 900.0, 750.0, 500.0}
    hi = t_k - 10 if mode == "separate" else 990.0
    assert np.all(t >= np.maximum(20, m_k)) and np.all(t < hi)
    np.testing.assert_array_equal(np.asarray(smp.m), m_k)


def test_flow_grids_and_configs_we_refuse():
  with pytest.raises(ConfigError, match="interval 0 is too short"):
    tdm.check_flow_grid(S.FlowSchedule(shift=3.0), tdm.TDMConfig(num_student_steps=8, upper_margin=50, total_steps=1000))
  tdm.check_flow_grid(SD3, tdm.TDMConfig())  # the defaults fit
  base = config_of(diffusers_scheduler(shift=3.0))
  for key, value in (("use_karras_sigmas", True), ("invert_sigmas", True), ("use_exponential_sigmas", True),
                     ("use_beta_sigmas", True), ("shift_terminal", 0.1), ("stochastic_sampling", True)):
    with pytest.raises(ConfigError, match=key):
      S.from_diffusers_config({**base, key: value})
  with pytest.raises(ConfigError, match="time_shift_type='cubic'"):
    S.from_diffusers_config({**base, "time_shift_type": "cubic"})
  with pytest.raises(ConfigError, match="unknown key 'sigma_schedule'"):
    S.from_diffusers_config({**base, "sigma_schedule": "karras"})
  dynamic = {**base, "use_dynamic_shifting": True}
  with pytest.raises(ConfigError, match="base_shift"):
    S.from_diffusers_config({**dynamic, "base_shift": None}, image_seq_len=1024)
  with pytest.raises(ConfigError, match="image sequence length"):
    S.from_diffusers_config(dynamic)


# ----------------------------------------------------------------------------- the iteration

@pytest.fixture(scope="module")
def flow_iteration():
  shape, b = (2, 4, 4), 8
  teacher = init_params(10, shape, extras=False)
  student = {"net": perturb(teacher, 11, 0.05), "gain": jnp.ones((), jnp.float32)}
  cond, uncond = make_cond(12, b)
  tx = recording_tx()
  state = tdm.init_state(student, teacher, tx, tx)
  run = functools.partial(tdm.tdm_iteration, nets=tdm.Networks(apply, student=student_net), schedule=SD3,
                          cfg=tdm.TDMConfig(guidance_scale=1.0, random_mid=True), student_tx=tx, fake_tx=tx,
                          sample_shape=shape)
  with_fake_lr = lambda lr: state._replace(fake_opt_state={**state.fake_opt_state, "lr": jnp.float32(lr)})
  return dict(step=jit(run), state=with_fake_lr, teacher=teacher, cond=cond, uncond=uncond, key=rng.iteration_key(0, 3))


def test_generator_gradient_vanishes_when_fake_equals_teacher(flow_iteration):
  """In flow form too: F = T (fake lr 0) at CFG 1 gives a zero student gradient; once F moves, it pulls."""
  s = flow_iteration
  new_state, metrics = s["step"](s["state"](0.0), s["teacher"], s["cond"], s["uncond"], s["key"])
  assert float(metrics["fake_grad_norm"]) > 1e-4 and float(metrics["fake_loss"]) > 0
  assert float(metrics["student_grad_norm"]) < 1e-7
  assert max_abs(new_state.student_opt_state["grads"]) < 1e-7
  _, metrics = s["step"](s["state"](1.0), s["teacher"], s["cond"], s["uncond"], s["key"])
  assert float(metrics["student_grad_norm"]) > 1e-4
  for v in metrics.values():
    assert np.all(np.isfinite(np.asarray(v)))


def test_fake_score_weight_is_min_snr_times_importance():
  t = jnp.asarray([990.0, 500.0, 300.0, 25.0])
  e, n = normal(5, (4, 3)), normal(6, (4, 3))
  smp = tdm.NoisySample(x_t=e, t=t, m=jnp.zeros(4), noise=n, effective_noise=e)
  sig = np.asarray(t) / 1000
  expect = np.minimum(((1 - sig) / sig) ** 2, 5.0) * np.asarray(tdm.importance_weight(e, n))
  np.testing.assert_allclose(np.asarray(tdm.fake_score_weight(SD3, tdm.TDMConfig(), smp)), expect, rtol=1e-4)


def test_unified_traced_step_count_equals_fixed_in_flow():
  shape, b = (3,), 4
  params = init_params(20, shape)
  cond, _ = make_cond(21, b)
  z = normal(22, (b,) + shape)
  net = strict_apply(need_steps=True)
  traced = jit(lambda k: tdm.rollout_first(net, params, SD3, z, cond, k, 4, 800, num_steps=jnp.full((b,), k)))
  for k in (1, 2, 4):
    got = traced(jnp.int32(k))
    want = tdm.rollout(net, params, SD3, z, cond, tdm.student_timesteps(800, k, SD3), num_steps=jnp.full((b,), k))
    np.testing.assert_allclose(np.asarray(got.x)[:k], np.asarray(want.x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got.x0)[:k], np.asarray(want.x0), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- samplers

def test_euler_sampler_equals_diffusers_flow_match_euler():
  """Our teacher sampler (CFG 2.5, 6 steps) step for step against FlowMatchEulerDiscreteScheduler.step."""
  import torch  # pylint: disable=g-import-not-at-top
  shape, b = (2, 4, 4), 3
  params = init_params(30, shape)
  cond, uncond = make_cond(31, b)
  z = normal(32, (b,) + shape)
  ours = jit(functools.partial(sample.teacher_sample, apply, num_steps=6, guidance_scale=2.5, solver="euler"))(
      params, SD3, z, cond, uncond)
  sched = diffusers_scheduler(shift=3.0)
  sched.set_timesteps(6)
  x = torch.from_numpy(np.array(z))
  for t in sched.timesteps:
    tt = jnp.full((b,), float(t), jnp.float32)
    v_c, v_u = (np.asarray(apply(params, jnp.asarray(x.numpy()), tt, c)) for c in (cond, uncond))
    v = torch.from_numpy(v_u + 2.5 * (v_c - v_u))
    x = sched.step(v, t, x).prev_sample
  np.testing.assert_allclose(np.asarray(ours), x.numpy(), atol=2e-5)


def gaussian_velocity(params, x_t, t, cond):
  """The exact velocity of data x0 ~ N(mu, c^2 I): x0_hat = E[x0 | x_t], v = eps_hat - x0_hat. Its flow ODE
  from x = z at sigma 1 ends at mu + c z, which makes an exact reference for the samplers."""
  del cond
  mu, c = params["mu"], params["c"]
  sig = (jnp.asarray(t, jnp.float32) / 1000.0)[:, None]
  a = 1.0 - sig
  x0_hat = mu + a * c**2 / (a**2 * c**2 + sig**2) * (x_t - a * mu)
  eps_hat = (x_t - a * x0_hat) / jnp.maximum(sig, 1e-12)
  return eps_hat - x0_hat


def test_dpm_solver_in_flow_form():
  """DPM-Solver++(2M) on flow: one step is Euler's; on a fine grid it lands nearer the exact ODE end than Euler
  (second order). On coarse SD3 grids it need not: their last interval is long in log-SNR, and the
  multistep extrapolation over it is large (6 steps: 0.89 against Euler's 0.61 here)."""
  b = 6
  params = {"mu": jnp.asarray([0.5, -1.0, 2.0]), "c": jnp.asarray([0.3, 1.0, 0.05])}
  z = normal(42, (b, 3))
  cond, _ = make_cond(41, b)
  exact = np.asarray(params["mu"] + params["c"] * z)
  run = lambda solver, k: np.asarray(jit(functools.partial(
      sample.teacher_sample, gaussian_velocity, num_steps=k, guidance_scale=1.0, solver=solver))(
          params, SD3, z, cond, None))
  euler, dpm = run("euler", 60), run("dpm_solver_2m", 60)
  assert np.all(np.isfinite(dpm))
  assert np.abs(dpm - exact).max() < 0.6 * np.abs(euler - exact).max()
  np.testing.assert_allclose(run("euler", 200), exact, atol=2e-2)  # the reference is the ODE's end
  np.testing.assert_allclose(run("dpm_solver_2m", 1), run("euler", 1), atol=1e-6)


def test_student_sampler_walks_the_student_grid():
  shape, b = (3,), 4
  params = init_params(50, shape)
  cond, _ = make_cond(51, b)
  z = normal(52, (b,) + shape)
  got = sample.student_sample(apply, params, SD3, z, cond, num_steps=4, total_steps=800)
  traj = tdm.rollout(apply, params, SD3, z, cond, tdm.student_timesteps(800, 4, SD3))
  np.testing.assert_allclose(np.asarray(got), np.asarray(traj.sample), rtol=1e-6, atol=1e-6)


def test_student_shift_is_a_flow_option():
  cfg = tdm.TDMConfig(student_shift=2.0)
  own = cfg.student_schedule(SD3)
  assert own.student_shift == 2.0 and own.shift == 3.0 and own.student_static_shift == 2.0
  np.testing.assert_allclose(tdm.student_timesteps(800, 2, own), [1000, 1000 * 2 * 0.5 / 1.5], rtol=1e-6)
  assert tdm.TDMConfig().student_schedule(SD3) is SD3
  with pytest.raises(ConfigError, match="student_shift=2.0 warps a rectified-flow grid"):
    cfg.student_schedule(S.make_schedule())
  # A dynamic teacher's grid exports as the static shift with the same warp: e^mu.
  dynamic = S.FlowSchedule(mu=0.8)
  u = np.linspace(0.05, 1.0, 9)
  k = dynamic.student_static_shift
  np.testing.assert_allclose(dynamic.student_sigma(u), k * u / (1 + (k - 1) * u), rtol=1e-6)
