"""Parity tests of tdm_jax.core.schedules against Diffusers' own (torch) schedulers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from tdm_jax.core import schedules as S

SDXL = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "steps_offset": 1,
    "timestep_spacing": "leading", "set_alpha_to_one": False, "clip_sample": False,
}
# Diffusers' DPM scheduler trips a NumPy 2 deprecation warning internally; not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def fake_denoiser(x, t):
    """Deterministic stand-in for a network: 0.1 x + sin(t / 100), t per sample or scalar."""
    t = np.asarray(t, np.float32)
    t = t.reshape(t.shape + (1,) * (x.ndim - t.ndim))
    return 0.1 * x + np.sin(t / 100.0).astype(np.float32)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


@pytest.fixture(scope="module")
def x_init():
    return np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)


# ---------------------------------------------------------------- alphas_cumprod

@pytest.mark.parametrize("kw", [
    dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02, num_train_timesteps=500),
])
def test_alphas_cumprod_match_ddpm(kw):
    ref = DDPMScheduler(**kw).alphas_cumprod.numpy()
    sch = S.from_diffusers_config(kw)
    assert sch.alphas_cumprod.dtype == jnp.float32
    assert sch.num_train_timesteps == len(ref)
    np.testing.assert_allclose(np.asarray(sch.alphas_cumprod), ref, rtol=1e-6, atol=0)
    if "beta_start" in kw:
        np.testing.assert_allclose(np.asarray(S.make_schedule(**kw).alphas_cumprod), ref, rtol=1e-6)


def test_sdxl_config_and_defaults():
    ref = DDIMScheduler.from_config(SDXL).alphas_cumprod.numpy()
    sch = S.from_diffusers_config(dict(SDXL, _class_name="EulerDiscreteScheduler", interpolation_type="linear"))
    np.testing.assert_allclose(np.asarray(sch.alphas_cumprod), ref, rtol=1e-6, atol=0)
    np.testing.assert_allclose(np.asarray(S.make_schedule().alphas_cumprod), ref, rtol=1e-6, atol=0)
    assert sch.prediction_type == "epsilon" and sch.num_train_timesteps == 1000
    # Diffusers' defaults when keys are missing: linear 1e-4..0.02, 1000 steps.
    np.testing.assert_allclose(np.asarray(S.from_diffusers_config({}).alphas_cumprod),
                               DDPMScheduler().alphas_cumprod.numpy(), rtol=1e-6)


def test_trained_betas_and_zero_snr():
    betas = np.linspace(1e-3, 0.05, 100)
    ref = DDPMScheduler(num_train_timesteps=100, trained_betas=betas).alphas_cumprod.numpy()
    sch = S.from_diffusers_config({"trained_betas": betas.tolist(), "num_train_timesteps": 100})
    np.testing.assert_allclose(np.asarray(sch.alphas_cumprod), ref, rtol=1e-6)

    cfg = dict(SDXL, rescale_betas_zero_snr=True, prediction_type="v_prediction")
    ref = DDIMScheduler.from_config(cfg).alphas_cumprod.numpy()
    sch = S.from_diffusers_config(cfg)
    np.testing.assert_allclose(np.asarray(sch.alphas_cumprod), ref, rtol=1e-5, atol=1e-7)
    assert float(sch.alphas_cumprod[-1]) == 0.0 and float(sch.snr(jnp.array(999))) == 0.0


def test_a_s_snr_and_clean_timestep():
    sch = S.make_schedule()
    t = jnp.array([-1, 0, 500, 999])
    ac = np.asarray(sch.alphas_cumprod)
    np.testing.assert_allclose(np.asarray(sch.a(t)), [1.0, *np.sqrt(ac[[0, 500, 999]])], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(sch.s(t)), [0.0, *np.sqrt(1 - ac[[0, 500, 999]])], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(sch.snr(t))[1:], (ac / (1 - ac))[[0, 500, 999]], rtol=1e-5)
    assert np.isinf(float(sch.snr(jnp.array(-1))))
    assert sch.a(t.reshape(2, 2)).shape == (2, 2)


def test_bad_inputs():
    with pytest.raises(ValueError, match="cosine_foo.*scaled_linear.*squaredcos_cap_v2"):
        S.from_diffusers_config({"beta_schedule": "cosine_foo"})
    with pytest.raises(ValueError, match="flow.*v_prediction"):
        S.from_diffusers_config({"prediction_type": "flow"})
    with pytest.raises(ValueError, match="epsilon"):
        S.make_schedule(prediction_type="eps")
    with pytest.raises(ValueError, match="trailing"):
        S.sampling_timesteps(1000, 10, spacing="karras")


# ---------------------------------------------------------------- parameterisations

@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_to_x0_eps_matches_ddim_and_round_trips(pred, x_init):
    cfg = dict(SDXL, prediction_type=pred)
    sch = S.from_diffusers_config(cfg)
    ref = DDIMScheduler.from_config(cfg)
    ref.set_timesteps(20)
    out = np.random.default_rng(1).standard_normal(x_init.shape).astype(np.float32)
    for t in (951, 501, 1):
        r = ref.step(torch.from_numpy(out), t, torch.from_numpy(x_init))
        tb = jnp.full((2,), t)
        x0, eps = sch.to_x0_eps(jnp.asarray(out), jnp.asarray(x_init), tb)
        np.testing.assert_allclose(np.asarray(x0), r.pred_original_sample.numpy(), rtol=1e-5, atol=1e-5)
        x_prev = S.ddim_step(sch, x0, eps, jnp.full((2,), max(t - 50, 0)))
        np.testing.assert_allclose(np.asarray(x_prev), r.prev_sample.numpy(), rtol=1e-5, atol=1e-5)
        # x_t is consistent with (x0, eps) and the target reproduces the output
        np.testing.assert_allclose(np.asarray(sch.add_noise(x0, eps, tb)), x_init, atol=1e-4)
        np.testing.assert_allclose(np.asarray(sch.from_x0_eps(x0, eps, tb)), out, atol=2e-4)
        np.testing.assert_allclose(np.asarray(sch.to_x0(jnp.asarray(out), jnp.asarray(x_init), tb)), np.asarray(x0))
        np.testing.assert_allclose(np.asarray(sch.to_eps(jnp.asarray(out), jnp.asarray(x_init), tb)), np.asarray(eps))


def test_v_target_formula():
    sch = S.make_schedule(prediction_type="v_prediction")
    rng = np.random.default_rng(2)
    x0, eps = (jnp.asarray(rng.standard_normal((3, 5)), jnp.float32) for _ in range(2))
    t = jnp.array([0, 400, 999])
    ref = DDPMScheduler.from_config(dict(SDXL, prediction_type="v_prediction")).get_velocity(
        torch.tensor(np.array(x0)), torch.tensor(np.array(eps)), torch.tensor([0, 400, 999]))
    np.testing.assert_allclose(np.asarray(sch.from_x0_eps(x0, eps, t)), ref.numpy(), rtol=1e-5, atol=1e-6)
    ref_noisy = DDPMScheduler.from_config(SDXL).add_noise(
        torch.tensor(np.array(x0)), torch.tensor(np.array(eps)), torch.tensor([0, 400, 999]))
    np.testing.assert_allclose(np.asarray(sch.add_noise(x0, eps, t)), ref_noisy.numpy(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- timesteps

@pytest.mark.parametrize("spacing,offset", [("leading", 1), ("leading", 0), ("trailing", 0), ("linspace", 0)])
@pytest.mark.parametrize("n", [1, 4, 25, 50])
def test_sampling_timesteps_match(spacing, offset, n):
    cfg = dict(SDXL, timestep_spacing=spacing, steps_offset=offset)
    ddim = DDIMScheduler.from_config(cfg)
    ddim.set_timesteps(n)
    ours = S.sampling_timesteps(1000, n, spacing, offset)
    assert ours.dtype.kind == "i"
    np.testing.assert_array_equal(ours, ddim.timesteps.numpy())
    dpm = DPMSolverMultistepScheduler.from_config(cfg)
    dpm.set_timesteps(n)
    np.testing.assert_array_equal(S.sampling_timesteps(1000, n, spacing, offset, scheduler="dpm"),
                                  dpm.timesteps.numpy())


# ---------------------------------------------------------------- samplers

@pytest.mark.parametrize("set_alpha_to_one", [False, True])
@pytest.mark.parametrize("n", [4, 25])
def test_ddim_loop_matches_diffusers(set_alpha_to_one, n, x_init):
    cfg = dict(SDXL, set_alpha_to_one=set_alpha_to_one)
    ref = DDIMScheduler.from_config(cfg)
    ref.set_timesteps(n)
    xr = torch.from_numpy(x_init)
    for t in ref.timesteps:
        xr = ref.step(torch.from_numpy(fake_denoiser(xr.numpy(), int(t))), t, xr).prev_sample

    sch = S.from_diffusers_config(cfg)
    ts = S.sampling_timesteps(1000, n, "leading", 1)
    final = -1 if set_alpha_to_one else 0  # Diffusers' final_alpha_cumprod
    targets = list(ts[1:]) + [final]
    x = jnp.asarray(x_init)
    for t, tn in zip(ts, targets):
        x0, eps = sch.to_x0_eps(jnp.asarray(fake_denoiser(np.asarray(x), np.full(2, t))), x, jnp.full((2,), t))
        x = S.ddim_step(sch, x0, eps, jnp.full((2,), tn))
    assert rel_err(x, xr.numpy()) < 1e-5


def _dpm_reference(x_init, n, spacing):
    cfg = dict(SDXL, timestep_spacing=spacing, algorithm_type="dpmsolver++", solver_order=2,
               lower_order_final=True, final_sigmas_type="zero")
    ref = DPMSolverMultistepScheduler.from_config(cfg)
    ref.set_timesteps(n)
    xr = torch.from_numpy(x_init)
    for t in ref.timesteps:
        xr = ref.step(torch.from_numpy(fake_denoiser(xr.numpy(), int(t))), t, xr).prev_sample
    return ref.timesteps.numpy(), xr.numpy()


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("n", [4, 10, 25])
def test_dpm_solver_2m_loop_matches_diffusers(n, spacing, x_init):
    ref_ts, xr = _dpm_reference(x_init, n, spacing)
    sch = S.make_schedule()
    ts = S.sampling_timesteps(1000, n, spacing, 1 if spacing == "leading" else 0, scheduler="dpm")
    np.testing.assert_array_equal(ts, ref_ts)
    nexts = list(ts[1:]) + [-1]
    x, x0_prev, t_prev = jnp.asarray(x_init), jnp.zeros_like(x_init), ts[0]
    for i, (t, tn) in enumerate(zip(ts, nexts)):
        tb = jnp.full((2,), t)
        x0 = sch.to_x0(jnp.asarray(fake_denoiser(np.asarray(x), np.full(2, t))), x, tb)
        # Diffusers: first order at the first step; with final_sigmas_type="zero" also at the last.
        first = i == 0 or i == len(ts) - 1
        x = S.dpm_solver_2m_step(sch, x, x0, x0_prev, tb, jnp.full((2,), t_prev), jnp.full((2,), tn), first)
        x0_prev, t_prev = x0, t
    assert rel_err(x, xr) < 2e-5


def test_dpm_scanned_loop_and_clean_target(x_init):
    """The whole 2M sampler as one jitted lax.scan with a traced first_order flag."""
    n = 10
    _, xr = _dpm_reference(x_init, n, "leading")
    sch = S.make_schedule()
    ts = jnp.asarray(S.sampling_timesteps(1000, n, "leading", 1, scheduler="dpm"))
    nexts = jnp.concatenate([ts[1:], jnp.array([-1])])
    prevs = jnp.concatenate([ts[:1], ts[:-1]])
    firsts = jnp.arange(n) == 0  # the last step is forced to first order by t_next = -1

    @jax.jit
    def sample(sch, x):
        def body(carry, inp):
            x, x0_prev = carry
            t, tp, tn, first = inp
            tb = jnp.full((x.shape[0],), t)
            out = 0.1 * x + jnp.sin(t.astype(jnp.float32) / 100.0)
            x0 = sch.to_x0(out, x, tb)
            x = S.dpm_solver_2m_step(sch, x, x0, x0_prev, tb, jnp.full_like(tb, tp), jnp.full_like(tb, tn), first)
            return (x, x0), None
        return jax.lax.scan(body, (x, jnp.zeros_like(x)), (ts, prevs, nexts, firsts))[0][0]

    x = sample(sch, jnp.asarray(x_init))
    assert np.isfinite(np.asarray(x)).all()
    assert rel_err(x, xr) < 2e-5


def test_dpm_step_to_clean_returns_x0(x_init):
    sch = S.make_schedule()
    x = jnp.asarray(x_init)
    x0 = 0.5 * x
    x0_prev = -x
    for first in (True, False):
        out = S.dpm_solver_2m_step(sch, x, x0, x0_prev, jnp.array([21, 41]), jnp.array([41, 81]),
                                   jnp.array([-1, -1]), first)
        np.testing.assert_allclose(np.asarray(out), np.asarray(x0), rtol=1e-6)
    # first order equals DDIM (same x0 and implied eps)
    t, tn = jnp.array([801, 401]), jnp.array([601, 201])
    eps = S.make_schedule(prediction_type="sample").to_eps(x0, x, t)
    out = S.dpm_solver_2m_step(sch, x, x0, x0_prev, t, t, tn, jnp.array(True))
    np.testing.assert_allclose(np.asarray(out), np.asarray(S.ddim_step(sch, x0, eps, tn)), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- forward diffusion

def test_diffuse_preserves_marginal():
    sch = S.make_schedule()
    rng = np.random.default_rng(3)
    m = jnp.array([0, -1, 100, 250, 500])
    t = jnp.array([500, 10, 999, 251, 900])
    v = 0.3
    x0 = jnp.asarray(np.sqrt(v) * rng.standard_normal((5, 200_000)), jnp.float32)
    eps, noise = (jnp.asarray(rng.standard_normal((5, 200_000)), jnp.float32) for _ in range(2))
    x_m = sch.add_noise(x0, eps, m)
    x_t = jax.jit(S.diffuse)(sch, x_m, m, t, noise)
    a_t, s_t = np.asarray(sch.a(t)), np.asarray(sch.s(t))
    np.testing.assert_allclose(np.asarray(x_t).var(axis=1), a_t**2 * v + s_t**2, rtol=0.02)
    # conditional on x0: mean a_t x0, residual std s_t
    resid = np.asarray(x_t) - a_t[:, None] * np.asarray(x0)
    np.testing.assert_allclose(resid.std(axis=1), s_t, rtol=0.02)
    np.testing.assert_allclose((resid * np.asarray(x0)).mean(axis=1), 0.0, atol=0.01)


# ---------------------------------------------------------------- jit / pytree

def test_schedule_is_pytree_and_jittable(x_init):
    sch = S.make_schedule(prediction_type="v_prediction")
    leaves, treedef = jax.tree_util.tree_flatten(sch)
    assert len(leaves) == 1 and leaves[0].shape == (1000,)
    x = jnp.asarray(x_init)
    t = jnp.array([3, 700])

    def everything(sch, x, t):
        x0, eps = sch.to_x0_eps(x, x, t)
        return (sch.a(t), sch.s(t), sch.snr(t), x0, eps, sch.from_x0_eps(x0, eps, t),
                sch.add_noise(x0, eps, t), S.ddim_step(sch, x0, eps, t - 1),
                S.diffuse(sch, x, t - 2, t, eps),
                S.dpm_solver_2m_step(sch, x, x0, eps, t, t + 5, t - 3, jnp.array(False)))

    jitted = jax.jit(everything)(sch, x, t)
    eager = everything(sch, x, t)
    for a, b in zip(jitted, eager):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    # the schedule's static fields are part of the treedef, so a new prediction type re-traces
    assert jax.tree_util.tree_structure(S.make_schedule()) != treedef
