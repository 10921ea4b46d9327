"""Discrete DDPM noise schedules as pure, jittable JAX functions.

Notation: ``N`` training timesteps, ``alphabar_t`` the cumulative product of ``1 - beta``,
``a_t = sqrt(alphabar_t)``, ``s_t = sqrt(1 - alphabar_t)`` and ``x_t = a_t x0 + s_t eps``.
The timestep ``-1`` means "clean data" (``a = 1, s = 0``); samplers use it as their last target.

Per-sample quantities (shape ``(B,)``, or scalars) broadcast over the trailing dims of ``(B, ...)``
tensors. Everything works in float32 and under ``jax.jit``.
"""

from __future__ import annotations

import math

import flax
import jax
import jax.numpy as jnp
import numpy as np

from tdm_jax.infra.errors import ConfigError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("leading", "trailing", "linspace")


def _bcast(v, x):
    """Append singleton axes to per-sample ``v`` so it broadcasts against ``x`` of shape (B, ...)."""
    v = jnp.asarray(v)
    return v.reshape(v.shape + (1,) * max(jnp.ndim(x) - v.ndim, 0))


@flax.struct.dataclass
class Schedule:
    """A discrete noise schedule. A pytree: ``alphas_cumprod`` is the only leaf."""

    alphas_cumprod: jax.Array  # (N,) float32
    prediction_type: str = flax.struct.field(pytree_node=False)
    num_train_timesteps: int = flax.struct.field(pytree_node=False)

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise ConfigError(
                f"unknown prediction_type {self.prediction_type!r}; supported: {PREDICTION_TYPES}")

    def _alphabar(self, t):
        """alphabar_t, with t = -1 (any negative t) meaning clean data (alphabar = 1)."""
        t = jnp.asarray(t)
        idx = jnp.clip(t, 0, self.num_train_timesteps - 1)
        ab = jnp.asarray(self.alphas_cumprod, jnp.float32)[idx]
        return jnp.where(t < 0, jnp.float32(1.0), ab)

    def a(self, t):
        """Signal scale sqrt(alphabar_t); 1 at t = -1."""
        return jnp.sqrt(self._alphabar(t))

    def s(self, t):
        """Noise scale sqrt(1 - alphabar_t); 0 at t = -1."""
        return jnp.sqrt(1.0 - self._alphabar(t))

    def snr(self, t):
        """Signal-to-noise ratio a^2 / s^2 (inf at t = -1)."""
        ab = self._alphabar(t)
        return ab / (1.0 - ab)

    def to_x0_eps(self, output, x_t, t):
        """Convert a model output of ``prediction_type`` at (x_t, t) into (x0, eps).

        epsilon: x0 = (x_t - s eps) / a.  v (= a eps - s x0): x0 = a x_t - s v, eps = a v + s x_t.
        sample: eps = (x_t - a x0) / s (undefined at t = -1).
        """
        a, s = _bcast(self.a(t), x_t), _bcast(self.s(t), x_t)
        if self.prediction_type == "epsilon":
            return (x_t - s * output) / a, output
        if self.prediction_type == "v_prediction":
            return a * x_t - s * output, a * output + s * x_t
        return output, (x_t - a * output) / s

    def to_x0(self, output, x_t, t):
        return self.to_x0_eps(output, x_t, t)[0]

    def to_eps(self, output, x_t, t):
        return self.to_x0_eps(output, x_t, t)[1]

    def from_x0_eps(self, x0, eps, t):
        """The model output in ``prediction_type`` for a given (x0, eps): the training target."""
        if self.prediction_type == "epsilon":
            return eps
        if self.prediction_type == "sample":
            return x0
        return _bcast(self.a(t), x0) * eps - _bcast(self.s(t), x0) * x0

    def add_noise(self, x0, eps, t):
        """Forward process q(x_t | x0): a_t x0 + s_t eps."""
        return _bcast(self.a(t), x0) * x0 + _bcast(self.s(t), x0) * eps


def _betas(beta_schedule, beta_start, beta_end, n):
    """float64 betas with the formulas Diffusers uses."""
    if beta_schedule == "linear":
        return np.linspace(beta_start, beta_end, n, dtype=np.float64)
    if beta_schedule == "scaled_linear":  # latent-diffusion schedule: linear in sqrt(beta)
        return np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64) ** 2
    if beta_schedule == "squaredcos_cap_v2":  # Nichol & Dhariwal cosine alphabar, beta capped at 0.999
        def f(u):
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array([min(1.0 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)])
    raise ConfigError(f"unknown beta_schedule {beta_schedule!r}; supported: {BETA_SCHEDULES}")


def _rescale_zero_terminal_snr(betas):
    """Lin et al. 2023 (Alg. 1): shift/scale sqrt(alphabar) so the last step has SNR exactly 0."""
    sq = np.sqrt(np.cumprod(1.0 - betas))
    sq0, sqT = sq[0], sq[-1]
    sq = (sq - sqT) * (sq0 / (sq0 - sqT))
    ab = sq**2
    return 1.0 - np.concatenate([ab[:1], ab[1:] / ab[:-1]])


def _schedule_from_betas(betas, prediction_type, rescale_zero_snr=False):
    # Diffusers stores betas and alphas = 1 - betas as float32; mirror that rounding (it matters in
    # the cosine tail), but take the cumulative product in float64 before the final float32 cast.
    betas = np.asarray(betas, np.float64).astype(np.float32)
    if rescale_zero_snr:
        betas = _rescale_zero_terminal_snr(betas.astype(np.float64)).astype(np.float32)
    alphas = (np.float32(1.0) - betas).astype(np.float64)
    ac = np.cumprod(alphas).astype(np.float32)
    return Schedule(jnp.asarray(ac), prediction_type=prediction_type, num_train_timesteps=int(ac.shape[0]))


def make_schedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                  num_train_timesteps=1000, prediction_type="epsilon") -> Schedule:
    """Build a schedule from the usual Diffusers parameters (defaults: Stable Diffusion / SDXL)."""
    betas = _betas(beta_schedule, beta_start, beta_end, num_train_timesteps)
    return _schedule_from_betas(betas, prediction_type)


def from_diffusers_config(config: dict) -> Schedule:
    """Schedule from a Diffusers ``scheduler_config.json`` dict; missing keys take Diffusers' defaults."""
    prediction_type = config.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise ConfigError(f"unknown prediction_type {prediction_type!r}; supported: {PREDICTION_TYPES}")
    return _schedule_from_betas(_config_betas(config), prediction_type,
                                bool(config.get("rescale_betas_zero_snr", False)))


def _config_betas(config: dict) -> np.ndarray:
    if config.get("trained_betas") is not None:
        return np.asarray(config["trained_betas"], np.float64)
    return _betas(config.get("beta_schedule", "linear"), config.get("beta_start", 0.0001),
                  config.get("beta_end", 0.02), int(config.get("num_train_timesteps", 1000)))


def betas_from_config(config: dict) -> np.ndarray:
    """The float64 betas a Diffusers scheduler config defines, zero-terminal-SNR rescaling applied."""
    betas = _config_betas(config)
    return _rescale_zero_terminal_snr(betas) if config.get("rescale_betas_zero_snr", False) else betas


def ddim_step(schedule: Schedule, x0, eps, t_next):
    """Deterministic DDIM (eta = 0) move to t_next: a x0 + s eps; t_next = -1 returns x0."""
    return schedule.add_noise(x0, eps, t_next)


def diffusion_coefficients(schedule: Schedule, m, t):
    """(a_t / a_m, b) of q(x_t | x_m) = N((a_t/a_m) x_m, b^2 I) for t >= m.

    b^2 = s_t^2 - (a_t/a_m)^2 s_m^2 = 1 - alphabar_t / alphabar_m, computed as -expm1 of a log
    difference so that it is exactly 0 at t == m (a direct difference leaves ~1e-3 under jit).
    """
    ab_m, ab_t = schedule._alphabar(m), schedule._alphabar(t)
    ratio = jnp.sqrt(ab_t / ab_m)
    b = jnp.sqrt(jnp.maximum(-jnp.expm1(jnp.log(ab_t) - jnp.log(ab_m)), 0.0))
    return ratio, b


def diffuse(schedule: Schedule, x_m, m, t, noise):
    """Forward-diffuse x_m from timestep m to a later t > m with fresh noise, q(x_t | x_m).

    x_t = (a_t/a_m) x_m + b noise with b^2 = s_t^2 - (a_t/a_m)^2 s_m^2, so the marginal of x_t given
    x0 is exactly a_t x0 + s_t eps. m = -1 reduces to ``add_noise``.
    """
    ratio, b = diffusion_coefficients(schedule, m, t)
    return _bcast(ratio, x_m) * x_m + _bcast(b, x_m) * noise


def _lam(schedule, t):
    """Half log-SNR lambda_t = log(a_t / s_t) (+inf at t = -1)."""
    return jnp.log(schedule.a(t)) - jnp.log(schedule.s(t))


def dpm_solver_2m_step(schedule: Schedule, x, x0, x0_prev, t, t_prev, t_next, first_order):
    """One multistep DPM-Solver++(2M) step (data prediction, midpoint form) from t to t_next.

    h = lambda_next - lambda_t. First order (= DDIM): x' = (s_next/s_t) x - a_next expm1(-h) x0.
    Second order replaces x0 by D = (1 + 1/(2r)) x0 - 1/(2r) x0_prev, r = h_prev/h with
    h_prev = lambda_t - lambda_prev (x0_prev is the data prediction made at t_prev).
    ``first_order`` may be traced. When t_next = -1 (h = inf) the second-order correction has no
    finite limit, so the step is first order and returns x0, like Diffusers' "zero" final sigma.
    """
    lam_t, lam_next, lam_prev = _lam(schedule, t), _lam(schedule, t_next), _lam(schedule, t_prev)
    h = lam_next - lam_t
    h_prev = lam_t - lam_prev
    finite = jnp.isfinite(h) & jnp.isfinite(h_prev) & (h_prev != 0)
    c = jnp.where(finite, jnp.where(finite, h, 0.0) / (2.0 * jnp.where(finite, h_prev, 1.0)), 0.0)
    use_first = jnp.logical_or(jnp.asarray(first_order, bool), jnp.asarray(t_next) < 0)
    c = jnp.where(use_first, 0.0, c)  # 1/(2r); 0 gives the first-order update
    d = x0 + _bcast(c, x0) * (x0 - x0_prev)
    ratio = schedule.s(t_next) / schedule.s(t)
    coef = -schedule.a(t_next) * jnp.expm1(-h)
    return _bcast(ratio, x) * x + _bcast(coef, x) * d


def sampling_timesteps(num_train_timesteps, num_steps, spacing="leading", steps_offset=0,
                       scheduler="ddim") -> np.ndarray:
    """Integer inference timesteps (highest first) as Diffusers' ``set_timesteps(num_steps)`` makes them.

    ``scheduler="ddim"`` follows DDIMScheduler (also DDPM/PNDM); ``"dpm"`` follows
    DPMSolverMultistepScheduler, whose "leading"/"linspace" grids differ (they split the range into
    num_steps + 1 pieces and drop the lowest point). "trailing" is the same for both.
    """
    n_train, n = int(num_train_timesteps), int(num_steps)
    if spacing not in SPACINGS:
        raise ConfigError(f"unknown timestep spacing {spacing!r}; supported: {SPACINGS}")
    if scheduler not in ("ddim", "dpm"):
        raise ConfigError(f"unknown scheduler {scheduler!r}; supported: ('ddim', 'dpm')")
    if not 1 <= n <= n_train:
        raise ConfigError(f"num_steps must be in [1, {n_train}], got {n}")
    if spacing == "trailing":
        ts = np.round(np.arange(n_train, 0, -n_train / n)).astype(np.int64) - 1
    elif scheduler == "ddim" and spacing == "linspace":
        ts = np.linspace(0, n_train - 1, n).round()[::-1].astype(np.int64)
    elif scheduler == "ddim":
        ts = (np.arange(0, n) * (n_train // n)).round()[::-1].astype(np.int64) + steps_offset
    elif spacing == "linspace":
        ts = np.linspace(0, n_train - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    else:
        ts = (np.arange(0, n + 1) * (n_train // (n + 1))).round()[::-1][:-1].astype(np.int64) + steps_offset
    return np.ascontiguousarray(ts)
