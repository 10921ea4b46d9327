"""Noise schedules as pairs (a(t), s(t)) with ``x_t = a(t) x0 + s(t) eps``: pure, jittable JAX functions.

Two kinds share one interface (a, s, snr, prediction conversions, add_noise, transition), and each
answers the grid questions itself (the distilled student's timesteps and interval ends, traced or not,
how timesteps are drawn, the teacher's sampling grid, what a stock call passes), so the TDM kernels,
the samplers and the exports never ask which one they hold:

- ``Schedule``: variance-preserving and discrete (DDPM / DDIM / DPM-Solver teachers: SD, SDXL,
  PixArt, CogVideoX). ``N`` integer training timesteps, ``alphabar_t`` the cumulative product of
  ``1 - beta``, ``a_t = sqrt(alphabar_t)``, ``s_t = sqrt(1 - alphabar_t)``.
- ``FlowSchedule``: rectified flow (SD3 / SD3.5, FLUX, Wan). ``sigma = t / N`` in [0, 1] with t a
  float, ``a = 1 - sigma``, ``s = sigma``, and the network predicts the velocity ``v = eps - x0``.

In both, the timestep ``-1`` means "clean data" (``a = 1, s = 0``); samplers use it as their last target.

Per-sample quantities (shape ``(B,)``, or scalars) broadcast over the trailing dims of ``(B, ...)``
tensors. Everything works in float32 and under ``jax.jit``.
"""

from __future__ import annotations

import math
from typing import Optional

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
    # The distilled student's timesteps given outright (highest first) for K = their count; () for the
    # rule S - 1 - j S / K (`tdm.student_timesteps`). Set by `TDMConfig.student_schedule`.
    student_timesteps: tuple = flax.struct.field(pytree_node=False, default=())

    continuous = False  # integer timesteps
    timestep_dtype = jnp.int32
    move_name = "DDIM"  # what the samplers' deterministic move is called on this schedule

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise ConfigError(
                f"unknown prediction_type {self.prediction_type!r}; supported: {PREDICTION_TYPES}")

    # --- the distilled student's grid (TDM.md: K student steps over S total steps) ---

    def with_student_grid(self, shift: float = 0.0, timesteps: tuple = ()) -> "Schedule":
        """This schedule with the student's grid given outright (`timesteps`, for K = their count)."""
        if shift:
            raise ConfigError(f"tdm.student_shift={shift} warps a rectified-flow grid; this teacher's schedule is "
                              f"variance-preserving (its grid is tdm.total_steps): leave it 0")
        return self.replace(student_timesteps=tuple(int(t) for t in timesteps)) if timesteps else self

    def student_grid(self, total_steps: int, num_steps: int) -> np.ndarray:
        """tau_j, j = 0..K-1, highest first (int32): the given grid for K = its count, else S - 1 - j S / K."""
        if len(self.student_timesteps) == num_steps:
            return np.asarray(self.student_timesteps, np.int32)
        return vp_student_grid(total_steps, num_steps)

    def interval_lower_ends(self, total_steps: int, num_steps: int) -> np.ndarray:
        """m_j: one above the next student timestep (0 for the last)."""
        return np.append(self.student_grid(total_steps, num_steps)[1:] + 1, 0).astype(np.int32)

    def traced_student_grid(self, total_steps: int, num_steps, length: int):
        """(tau_j, the rollout's next timestep or -1, m_j) for j < length from a K that may be traced."""
        j = jnp.arange(length, dtype=jnp.int32)
        last = j + 1 >= num_steps
        taus = total_steps - 1 - (j * total_steps) // num_steps
        below = total_steps - 1 - ((j + 1) * total_steps) // num_steps
        given = self.student_timesteps
        if given:  # K = len(given) takes the given grid, any other K the rule
            padded = jnp.asarray(given + (0,) * (length + 1 - len(given)), jnp.int32)[:length + 1]
            use = jnp.asarray(num_steps) == len(given)
            taus, below = jnp.where(use, padded[:length], taus), jnp.where(use, padded[1:], below)
        return taus, jnp.where(last, -1, below), jnp.where(last, 0, below + 1)

    def check_student_grid(self, cfg) -> None:
        """Every interval leaves room for TDM's draws: `TDMConfig` checks a VP grid itself."""
        del cfg

    def draw_timesteps(self, key, shape, lo, hi):
        """Integer timesteps uniform in [lo, hi)."""
        return jax.random.randint(key, shape, lo, hi)

    def draw_top(self, total_steps: int) -> int:
        """The top of "shared" mode's draws: S."""
        return total_steps

    def training_timesteps(self, key, batch: int):
        """A denoising-training draw: t ~ U{0..N-1}."""
        return jax.random.randint(key, (batch,), 0, self.num_train_timesteps)

    def min_snr_weight(self, t, gamma: float):
        """min(SNR, gamma) on the x0 error, in this prediction's terms: eps min(snr, g) / snr; v
        min(snr, g) / (snr + 1); sample min(snr, g)."""
        snr = self.snr(t)
        clipped = jnp.minimum(snr, gamma)
        if self.prediction_type == "epsilon":
            return clipped / snr
        if self.prediction_type == "v_prediction":
            return clipped / (snr + 1.0)
        return clipped

    def teacher_grid(self, num_steps: int, spacing: str = "leading", steps_offset: int = 0,
                     solver: str = "ddim") -> np.ndarray:
        """The teacher's sampling timesteps as Diffusers' `set_timesteps(num_steps)` makes them."""
        return sampling_timesteps(self.num_train_timesteps, num_steps, spacing, steps_offset,
                                  scheduler="dpm" if solver == "dpm_solver_2m" else "ddim")

    def stock_sigmas(self, num_steps: int):
        """What a stock call passes to sample the K-step student besides K: nothing (None)."""
        del num_steps
        return None

    def student_scheduler_config(self, teacher: dict, total_steps: Optional[int] = None) -> dict:
        """The exported student's Diffusers scheduler: a DDIM one (CogVideoX's own for its teachers, which
        keeps the SNR shift) with the teacher's noise schedule and "trailing" spacing, so that a stock
        `set_timesteps(K)` lands on tau_j = S - 1 - j S / K and its last step returns the clean estimate.

        With S = `total_steps` below num_train_timesteps (the PixArt demo's S = 900), the schedule is written
        as its first S betas (`trained_betas`, num_train_timesteps S): alphabar is the teacher's at every
        t < S, and "trailing" spacing over S steps still gives the student's timesteps."""
        cogvideox = teacher.get("_class_name") in SNR_SHIFTED_SCHEDULERS
        out = {"_class_name": "CogVideoXDDIMScheduler" if cogvideox else "DDIMScheduler"}
        out.update({k: teacher[k] for k in _VP_SCHEDULE_KEYS if k in teacher})
        if cogvideox:  # its default shift (3.0) made explicit: the exported folder must not depend on defaults
            out["snr_shift_scale"] = float(teacher.get("snr_shift_scale", 3.0))
        n_train = int(teacher.get("num_train_timesteps", 1000))
        if total_steps is not None and total_steps < n_train:
            betas = betas_from_config(teacher)[:total_steps]
            out.update(trained_betas=[float(np.float32(b)) for b in betas], num_train_timesteps=int(total_steps),
                       rescale_betas_zero_snr=False)
            if cogvideox:  # the betas already hold the shift
                out["snr_shift_scale"] = 1.0
        out.update(timestep_spacing="trailing", steps_offset=0, set_alpha_to_one=True, clip_sample=False,
                   thresholding=False)
        return out

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

    def transition(self, m, t):
        """(a_t / a_m, b) of q(x_t | x_m) = N((a_t/a_m) x_m, b^2 I) for t >= m.

        b^2 = s_t^2 - (a_t/a_m)^2 s_m^2 = 1 - alphabar_t / alphabar_m, computed as -expm1 of a log
        difference so that it is exactly 0 at t == m (a direct difference leaves ~1e-3 under jit).
        """
        ab_m, ab_t = self._alphabar(m), self._alphabar(t)
        ratio = jnp.sqrt(ab_t / ab_m)
        b = jnp.sqrt(jnp.maximum(-jnp.expm1(jnp.log(ab_t) - jnp.log(ab_m)), 0.0))
        return ratio, b


# FlowMatchEulerDiscreteScheduler's config keys: those we model, and those whose only modelled value is fixed.
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)
_FLOW_KEYS = ("num_train_timesteps", "shift", "use_dynamic_shifting", "base_shift", "max_shift",
              "base_image_seq_len", "max_image_seq_len", "time_shift_type")
_FLOW_FIXED = {"invert_sigmas": (False,), "shift_terminal": (None,), "use_karras_sigmas": (False,),
               "use_exponential_sigmas": (False,), "use_beta_sigmas": (False,), "stochastic_sampling": (False,)}
TIME_SHIFT_TYPES = ("exponential", "linear")


@flax.struct.dataclass
class FlowSchedule:
    """Rectified flow: sigma = t / N, x_t = (1 - sigma) x0 + sigma eps, the network predicts v = eps - x0.

    ``shift`` (SD3: 3) warps a uniform sigma grid as k s / (1 + (k - 1) s); with ``mu`` set (dynamic
    shifting, FLUX-style, fixed by the run's image size) the warp is instead Diffusers' time shift
    e^mu / (e^mu + 1/s - 1) ("exponential") or mu / (mu + 1/s - 1) ("linear"). ``student_shift`` is
    the distilled student's own grid warp (0: the teacher's). No array leaves: every field is static.
    """

    num_train_timesteps: int = flax.struct.field(pytree_node=False, default=1000)
    shift: float = flax.struct.field(pytree_node=False, default=1.0)
    mu: Optional[float] = flax.struct.field(pytree_node=False, default=None)
    time_shift_type: str = flax.struct.field(pytree_node=False, default="exponential")
    student_shift: float = flax.struct.field(pytree_node=False, default=0.0)

    continuous = True  # float timesteps t = N sigma
    timestep_dtype = jnp.float32
    prediction_type = "flow"
    move_name = "Euler"  # the DDIM move between sigmas is the flow ODE's Euler step

    def __post_init__(self):
        if self.time_shift_type not in TIME_SHIFT_TYPES:
            raise ConfigError(f"scheduler config: unsupported time_shift_type={self.time_shift_type!r}; "
                              f"supported: {TIME_SHIFT_TYPES}")
        if not self.shift > 0 or self.student_shift < 0:
            raise ConfigError(f"flow shift must be > 0 (got {self.shift}) and the student's >= 0 (0: the "
                              f"teacher's; got {self.student_shift})")

    def sigma(self, t):
        """t / N in [0, 1]; any negative t (the clean marker -1) is sigma 0."""
        t = jnp.asarray(t, jnp.float32)
        return jnp.where(t < 0, jnp.float32(0.0), jnp.clip(t / self.num_train_timesteps, 0.0, 1.0))

    def a(self, t):
        return 1.0 - self.sigma(t)

    def s(self, t):
        return self.sigma(t)

    def snr(self, t):
        """(1 - sigma)^2 / sigma^2 (inf at sigma 0, 0 at sigma 1)."""
        sig = self.sigma(t)
        return (1.0 - sig) ** 2 / sig**2

    def to_x0_eps(self, output, x_t, t):
        """From a velocity v = eps - x0 at (x_t, sigma): x0 = x_t - sigma v, eps = x_t + (1 - sigma) v."""
        sig = _bcast(self.sigma(t), x_t)
        return x_t - sig * output, x_t + (1.0 - sig) * output

    def to_x0(self, output, x_t, t):
        return self.to_x0_eps(output, x_t, t)[0]

    def to_eps(self, output, x_t, t):
        return self.to_x0_eps(output, x_t, t)[1]

    def from_x0_eps(self, x0, eps, t):
        """The velocity target eps - x0 (the same at every t)."""
        del t
        return eps - x0

    def add_noise(self, x0, eps, t):
        """(1 - sigma) x0 + sigma eps; as a move between noise levels (ddim_step) it is the flow ODE's Euler step."""
        sig = _bcast(self.sigma(t), x0)
        return (1.0 - sig) * x0 + sig * eps

    def transition(self, m, t):
        """(a_t / a_m, b) of the forward move from m to t >= m: b^2 = sigma_t^2 - (a_t/a_m)^2 sigma_m^2,
        so x_t keeps the flow marginal (1 - sigma_t) x0 + sigma_t eps; exactly (1, 0) at t == m."""
        sig_m, sig_t = self.sigma(m), self.sigma(t)
        ratio = (1.0 - sig_t) / (1.0 - sig_m)
        b = jnp.sqrt(jnp.maximum(sig_t**2 - (ratio * sig_m) ** 2, 0.0))
        return ratio, b

    def warp(self, u, shift: float = 0.0):
        """The shifted grid point of a uniform u in [0, 1] (0 stays 0): k u / (1 + (k - 1) u) with
        k = `shift` (0: the teacher's shift, or its dynamic time shift when mu is set)."""
        xp = np if isinstance(u, (np.ndarray, float, int)) else jnp
        if shift or self.mu is None:
            k = shift or self.shift
            return k * u / (1.0 + (k - 1.0) * u)
        safe = xp.where(u > 0, u, 1.0)
        odds = 1.0 / safe - 1.0
        base = math.exp(self.mu) if self.time_shift_type == "exponential" else self.mu
        return xp.where(u > 0, base / (base + odds), 0.0)

    def student_sigma(self, u):
        """The distilled student's grid warp: `student_shift`, or the teacher's when 0."""
        return self.warp(u, self.student_shift)

    # --- the distilled student's grid: tau_j = N shift((K - j) / K), the draws floats ---

    def with_student_grid(self, shift: float = 0.0, timesteps: tuple = ()) -> "FlowSchedule":
        """This schedule with the student's own grid warp `shift` (0: the teacher's)."""
        if timesteps:
            raise ConfigError(f"tdm.student_timesteps={tuple(timesteps)} gives a variance-preserving grid "
                              f"outright; this teacher is a rectified flow: set tdm.student_shift instead")
        return self.replace(student_shift=float(shift)) if shift else self

    def student_grid(self, total_steps: int, num_steps: int) -> np.ndarray:
        """tau_j = N shift((K - j) / K) as float32 (shift 3, K = 4: 1000 900 750 500); S unused. float32
        throughout, as `traced_student_grid` computes the same points under jit and a stock scheduler its sigmas."""
        del total_steps
        u = (np.float32(num_steps) - np.arange(num_steps, dtype=np.float32)) / np.float32(num_steps)
        return np.asarray(np.float32(self.num_train_timesteps) * self.student_sigma(u), np.float32)

    def interval_lower_ends(self, total_steps: int, num_steps: int) -> np.ndarray:
        """m_j: the next student time itself (0 for the last)."""
        return np.append(self.student_grid(total_steps, num_steps)[1:], 0).astype(np.float32)

    def traced_student_grid(self, total_steps: int, num_steps, length: int):
        """(tau_j, the rollout's next time or -1, m_j) for j < length from a K that may be traced."""
        del total_steps
        j = jnp.arange(length, dtype=jnp.int32)
        last = j + 1 >= num_steps
        point = lambda i: self.num_train_timesteps * self.student_sigma(
            jnp.maximum(num_steps - i, 0).astype(jnp.float32) / num_steps)
        taus, below = point(j), point(j + 1)
        return taus, jnp.where(last, -1.0, below), jnp.where(last, 0.0, below)

    def check_student_grid(self, cfg) -> None:
        """Every student interval must leave room for TDM's draws (`cfg` a TDMConfig): t ~ U[max(min_timestep,
        m_k), t_k - upper_margin) non-empty, and with random_mid m ~ U[m_k, t_k - mid_margin) too."""
        for k in cfg.all_step_counts:
            taus = self.student_grid(cfg.total_steps, k)
            lows = self.interval_lower_ends(cfg.total_steps, k)
            hi = (taus - cfg.upper_margin) if cfg.interval_mode == "separate" else np.full_like(
                taus, self.num_train_timesteps - cfg.upper_margin)
            narrow = np.maximum(cfg.min_timestep, lows) >= hi
            if cfg.random_mid:
                narrow |= (lows >= taus - cfg.mid_margin) | (cfg.mid_margin < cfg.upper_margin)
            if narrow.any():
                raise ConfigError(
                    f"with {k} student steps the flow grid (1000 sigma) is {np.round(taus, 2).tolist()}; its interval "
                    f"{int(np.argmax(narrow))} is too short for min_timestep={cfg.min_timestep}, upper_margin="
                    f"{cfg.upper_margin}, mid_margin={cfg.mid_margin}: lower the margins or the student shift")

    def draw_timesteps(self, key, shape, lo, hi):
        """Float times uniform in [lo, hi)."""
        return jax.random.uniform(key, shape, jnp.float32, lo, hi)

    def draw_top(self, total_steps: int) -> int:
        """The top of "shared" mode's draws: N."""
        del total_steps
        return self.num_train_timesteps

    def training_timesteps(self, key, batch: int):
        """A denoising-training draw: sigma = shift(u) with u logit-normal (SD3's "logit_normal" scheme:
        mean 0, std 1, on the teacher's shifted grid), t = N sigma."""
        u = jax.nn.sigmoid(jax.random.normal(key, (batch,), jnp.float32))
        return self.num_train_timesteps * self.warp(u)

    def min_snr_weight(self, t, gamma: float):
        """min(SNR, gamma) on the x0 error of a velocity (x0 = x_t - sigma v): min(snr, g) sigma^2."""
        return jnp.minimum(self.snr(t), gamma) * self.s(t)**2

    def teacher_grid(self, num_steps: int, spacing: str = "leading", steps_offset: int = 0,
                     solver: str = "ddim") -> np.ndarray:
        """The teacher's sampling times, FlowMatchEulerDiscreteScheduler's for `num_steps` (whatever the
        spacing says: a flow scheduler has one grid)."""
        del spacing, steps_offset, solver
        return self.num_train_timesteps * flow_sampling_sigmas(self, num_steps)

    def stock_sigmas(self, num_steps: int) -> list:
        """The sigmas a stock flow pipeline call passes for a K-step student: 1, (K-1)/K, ..., 1/K, which its
        scheduler warps with the exported shift onto the student's grid."""
        return [float((num_steps - j) / num_steps) for j in range(num_steps)]

    def student_scheduler_config(self, teacher: dict, total_steps: Optional[int] = None) -> dict:
        """The exported student's FlowMatchEulerDiscreteScheduler: the teacher's config with the student's
        grid warp as a static shift and dynamic shifting off (a dynamic teacher's shift was fixed at the
        trained size); stock calls pass `stock_sigmas(K)`, which it warps onto the student's grid."""
        del total_steps
        out = {k: v for k, v in teacher.items() if not k.startswith("_")}
        out.update(_class_name="FlowMatchEulerDiscreteScheduler", shift=self.student_static_shift,
                   use_dynamic_shifting=False)
        return out

    @property
    def student_static_shift(self) -> float:
        """The static shift k whose warp k u / (1 + (k - 1) u) is the student's: `student_shift`, the
        teacher's shift, or a dynamic teacher's time shift at its mu (e^mu exponential, mu linear: the
        same function of u), so that a stock scheduler without dynamic shifting reproduces the grid."""
        if self.student_shift or self.mu is None:
            return float(self.student_shift or self.shift)
        return float(math.exp(self.mu) if self.time_shift_type == "exponential" else self.mu)

    @classmethod
    def from_diffusers_config(cls, config: dict, image_seq_len: Optional[int] = None) -> "FlowSchedule":
        """From a FlowMatchEulerDiscreteScheduler config; options we do not model are refused by name.

        With `use_dynamic_shifting`, mu is Diffusers' `calculate_shift` of the run's image sequence length
        (latent patches), linear between (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift).
        """
        for key, value in config.items():
            if key.startswith("_") or key in _FLOW_KEYS:
                continue
            if key not in _FLOW_FIXED:
                raise ConfigError(f"scheduler config: unknown key {key!r} for a FlowMatchEulerDiscreteScheduler; "
                                  f"tdm_jax models {sorted(_FLOW_KEYS + tuple(_FLOW_FIXED))}")
            if value not in _FLOW_FIXED[key]:
                raise ConfigError(f"scheduler config: {key}={value!r} is not modelled by tdm_jax (supported: "
                                  f"{_FLOW_FIXED[key]}); remove the key or set it to {_FLOW_FIXED[key][0]!r}")
        mu = None
        if config.get("use_dynamic_shifting", False):
            bounds = [config.get(k) for k in ("base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len")]
            if any(b is None for b in bounds) or bounds[2] == bounds[3]:
                raise ConfigError("scheduler config: use_dynamic_shifting needs base_shift, max_shift, "
                                  "base_image_seq_len and max_image_seq_len (distinct lengths); got "
                                  f"{dict(zip(('base_shift', 'max_shift', 'base_image_seq_len', 'max_image_seq_len'), bounds))}")
            if image_seq_len is None:
                raise ConfigError("scheduler config: use_dynamic_shifting shifts by image size; give the image "
                                  "sequence length (latent patches) the schedule is for")
            base_shift, max_shift, base_len, max_len = (float(b) for b in bounds)
            slope = (max_shift - base_shift) / (max_len - base_len)
            mu = float(image_seq_len) * slope + (base_shift - slope * base_len)
        return cls(num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
                   shift=float(config.get("shift", 1.0)), mu=mu,
                   time_shift_type=str(config.get("time_shift_type", "exponential")))


def vp_student_grid(total_steps: int, num_steps: int) -> np.ndarray:
    """The VP student's rule tau_j = S - 1 - j S / K, j = 0..K-1 (S=800, K=4: 799 599 399 199), int32."""
    return np.array([total_steps - 1 - (j * total_steps) // num_steps for j in range(num_steps)], dtype=np.int32)


def flow_sampling_sigmas(schedule: FlowSchedule, num_steps: int) -> np.ndarray:
    """The K sigmas (highest first, float32) of Diffusers' FlowMatchEulerDiscreteScheduler.set_timesteps(K):
    evenly spaced in t from N sigma_max to N sigma_min of its training grid, then warped (so the low end
    is warped twice, as Diffusers does); the sampler's timesteps are N times these, then clean data."""
    n = schedule.num_train_timesteps
    if not 1 <= int(num_steps) <= n:
        raise ConfigError(f"num_steps must be in [1, {n}], got {num_steps}")
    train = np.linspace(1, n, n, dtype=np.float32)[::-1] / n
    if schedule.mu is None:
        train = schedule.shift * train / (1 + (schedule.shift - 1) * train)
    sigma_max, sigma_min = float(train[0]), float(train[-1])
    sigmas = np.linspace(sigma_max * n, sigma_min * n, int(num_steps)) / n
    return np.asarray(schedule.warp(sigmas), np.float32)


def from_diffusers_config(config: dict, image_seq_len: Optional[int] = None):
    """The schedule a Diffusers ``scheduler_config.json`` dict defines: a FlowSchedule for flow-matching
    schedulers (`image_seq_len`, in latent patches, fixes dynamic shifting), else the variance-preserving
    Schedule (`vp_from_diffusers_config`)."""
    if config.get("_class_name") in FLOW_SCHEDULERS:
        return FlowSchedule.from_diffusers_config(config, image_seq_len)
    return vp_from_diffusers_config(config)


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


# CogVideoX's DDIM and DPM schedulers: alphabar shifted by `snr_shift_scale` (default 3.0), then rescaled.
SNR_SHIFTED_SCHEDULERS = ("CogVideoXDDIMScheduler", "CogVideoXDPMScheduler")
# Keys of a VP scheduler config that define its noise schedule (what an exported student's scheduler keeps).
_VP_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                     "prediction_type", "rescale_betas_zero_snr", "snr_shift_scale")


def vp_from_diffusers_config(config: dict) -> Schedule:
    """Schedule from a Diffusers ``scheduler_config.json`` dict of a variance-preserving scheduler (DDPM,
    DDIM, Euler, DPM-Solver, CogVideoX's DDIM, ...); missing keys take Diffusers' defaults."""
    prediction_type = config.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise ConfigError(f"unknown prediction_type {prediction_type!r}; supported: {PREDICTION_TYPES}")
    if config.get("_class_name") in SNR_SHIFTED_SCHEDULERS:
        ac = snr_shifted_alphas_cumprod(config)
        return Schedule(jnp.asarray(ac.astype(np.float32)), prediction_type=prediction_type,
                        num_train_timesteps=int(ac.shape[0]))
    return _schedule_from_betas(_config_betas(config), prediction_type,
                                bool(config.get("rescale_betas_zero_snr", False)))


def snr_shifted_alphas_cumprod(config: dict) -> np.ndarray:
    """float64 alphabar of CogVideoX's schedulers: the betas' cumulative product (in float64, scaled-linear
    betas included, as those schedulers compute them), its SNR divided by `snr_shift_scale` (alphabar / (k +
    (1 - k) alphabar): the SD3-style shift that CogVideoX-2B trains with k = 3 and 5B with k = 1), then,
    with `rescale_betas_zero_snr`, rescaled to zero terminal SNR on alphabar itself (Lin et al. 2023)."""
    if config.get("trained_betas") is not None:
        betas = np.asarray(np.asarray(config["trained_betas"], np.float32), np.float64)
    else:
        betas = _betas(config.get("beta_schedule", "scaled_linear"), config.get("beta_start", 0.00085),
                       config.get("beta_end", 0.012), int(config.get("num_train_timesteps", 1000)))
        if config.get("beta_schedule", "scaled_linear") != "scaled_linear":  # float32 there, as DDIM's
            betas = betas.astype(np.float32).astype(np.float64)
    k = float(config.get("snr_shift_scale", 3.0))
    if not k > 0:
        raise ConfigError(f"scheduler config: snr_shift_scale={k} must be > 0")
    ac = np.cumprod(1.0 - betas)
    ac = ac / (k + (1.0 - k) * ac)
    if config.get("rescale_betas_zero_snr", False):
        sq = np.sqrt(ac)
        sq = (sq - sq[-1]) * (sq[0] / (sq[0] - sq[-1]))
        ac = sq**2
    return ac


def _config_betas(config: dict) -> np.ndarray:
    if config.get("trained_betas") is not None:
        return np.asarray(config["trained_betas"], np.float64)
    return _betas(config.get("beta_schedule", "linear"), config.get("beta_start", 0.0001),
                  config.get("beta_end", 0.02), int(config.get("num_train_timesteps", 1000)))


def betas_from_config(config: dict) -> np.ndarray:
    """The float64 betas a Diffusers scheduler config defines, zero-terminal-SNR rescaling (and CogVideoX's
    SNR shift) applied."""
    if config.get("_class_name") in SNR_SHIFTED_SCHEDULERS:
        ac = snr_shifted_alphas_cumprod(config)
        return 1.0 - np.concatenate([ac[:1], ac[1:] / np.where(ac[:-1] > 0, ac[:-1], 1.0)])
    betas = _config_betas(config)
    return _rescale_zero_terminal_snr(betas) if config.get("rescale_betas_zero_snr", False) else betas


def ddim_step(schedule: Schedule, x0, eps, t_next):
    """Deterministic DDIM (eta = 0) move to t_next: a x0 + s eps; t_next = -1 returns x0."""
    return schedule.add_noise(x0, eps, t_next)


def diffusion_coefficients(schedule, m, t):
    """(a_t / a_m, b) of q(x_t | x_m) = N((a_t/a_m) x_m, b^2 I) for t >= m, for either kind of schedule."""
    return schedule.transition(m, t)


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
