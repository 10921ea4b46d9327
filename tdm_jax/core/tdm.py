"""Trajectory Distribution Matching (TDM) as pure, jittable functions.

Everything here works on `apply(params, x_t, t, cond, **extra) -> model output` callables
(epsilon, v or x0 prediction, converted with the schedule), any sample shape `(B, ...)`
and any conditioning pytree. It knows nothing of Flax modules, sharding or files.
The method is specified in TDM.md (Luo et al., arXiv 2503.06674); names follow it:
K student steps over S total steps, trajectory points x_k at t_k, interval ends m_k.

The same kernels serve variance-preserving teachers (integer timesteps; the grid is S - 1 - j S / K)
and rectified-flow teachers (t = 1000 sigma as a float; the grid is 1000 shift((K - j) / K), the
draws uniform over floats with the same margins): the schedule answers the grid and draw questions
itself (`core/schedules.py`), and every move goes through its (a, s).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tdm_jax.core import rng
from tdm_jax.core.schedules import Schedule, ddim_step, diffusion_coefficients, vp_student_grid
from tdm_jax.infra.errors import ConfigError

Apply = Callable[..., jax.Array]
PyTree = Any

LOSS_TYPES = ("huber", "huber_norm", "l2")
INTERVAL_MODES = ("separate", "shared")


@dataclasses.dataclass(frozen=True)
class TDMConfig:
  """Every knob of TDM.md; the defaults are the authors' demo."""
  num_student_steps: int = 4  # K
  total_steps: int = 800  # S
  guidance_scale: float = 2.0  # w_cfg of the teacher in the generator loss
  interval_mode: str = "separate"  # "separate": t < t_k - upper_margin; "shared": t < S - upper_margin
  random_mid: bool = False  # m ~ U[m_k, t_k - mid_margin) instead of m = m_k
  min_timestep: int = 20  # t >= max(min_timestep, m)
  upper_margin: int = 10
  mid_margin: int = 20
  min_snr_gamma: float = 5.0  # fake-score weight min(snr, gamma); <= 0 disables
  importance_weighting: bool = True
  loss_type: str = "huber"  # "huber" (demo, element-wise c), "huber_norm" (paper, per-sample norm), "l2"
  huber_c: float = 1e-3
  huber_norm_coef: float = 0.00054  # paper: c = coef * sqrt(elements per sample)
  normalizer_floor: float = 1e-8  # keeps the per-sample normaliser d away from 0
  step_choices: tuple = ()  # "unified" TDM: K drawn per iteration from these; student and fake score get `num_steps=K`
  step_weights: tuple = ()  # relative odds of each of step_choices (empty: uniform)
  condition_fake_on_segment: bool = False  # fake score gets `segment=k` (meant for "shared" mode)
  student_shift: float = 0.0  # flow teachers: the student's grid is shift((K - j) / K) with this k (0: the teacher's)
  student_timesteps: tuple = ()  # VP teachers: the grid of K = len outright, highest first (other K: the rule)

  def __post_init__(self):
    if self.step_weights and (len(self.step_weights) != len(self.step_choices)
                              or not all(w > 0 for w in self.step_weights)):
      raise ConfigError(f"tdm.step_weights={self.step_weights} must hold one positive weight per entry of "
                        f"tdm.step_choices={self.step_choices} (or be empty: every K equally often)")
    if self.loss_type not in LOSS_TYPES:
      raise ConfigError(f"tdm.loss_type={self.loss_type!r}; expected one of {LOSS_TYPES}")
    if self.interval_mode not in INTERVAL_MODES:
      raise ConfigError(f"tdm.interval_mode={self.interval_mode!r}; expected one of {INTERVAL_MODES}")
    grid = tuple(self.student_timesteps)
    if grid:
      if len(grid) not in self.all_step_counts:
        raise ConfigError(f"tdm.student_timesteps={grid} is a {len(grid)}-step grid, but the student trains for "
                          f"K in {self.all_step_counts}; give one of those many timesteps or leave it empty")
      lows = grid[1:] + (-1,)
      if (any(not 0 <= t < self.total_steps for t in grid) or any(a <= b for a, b in zip(grid, grid[1:]))
          or any(t - self.upper_margin <= max(self.min_timestep, low + 1) for t, low in zip(grid, lows))
          or (self.random_mid and any(t - self.mid_margin <= low + 1 for t, low in zip(grid, lows)))):
        raise ConfigError(f"tdm.student_timesteps={grid} must be integers in [0, tdm.total_steps={self.total_steps}) "
                          f"in falling order, each above the next by more than upper_margin={self.upper_margin} "
                          f"and above min_timestep={self.min_timestep} + upper_margin")
    for k in self.all_step_counts:
      if grid and k == len(grid):
        continue
      width = self.total_steps // k
      # The narrowest draw, t ~ U[max(min_timestep, m_k), t_k - upper_margin), must be non-empty.
      # With random_mid, m ~ U[m_k, t_k - mid_margin) must be non-empty and stay below t_k - upper_margin.
      if width - 1 - self.upper_margin <= self.min_timestep or (
          self.random_mid and (width - 1 <= self.mid_margin or self.mid_margin < self.upper_margin)):
        raise ConfigError(
            f"tdm.total_steps={self.total_steps} with {k} student steps gives intervals of {width} "
            f"timesteps, too short for min_timestep={self.min_timestep}, upper_margin="
            f"{self.upper_margin}, mid_margin={self.mid_margin} (random_mid needs mid_margin >= upper_margin); "
            f"raise total_steps or change the margins")

  def student_schedule(self, schedule):
    """The teacher's schedule with this config's student grid: `student_shift` (flow schedules) or
    `student_timesteps` (variance-preserving ones); each schedule refuses the other's."""
    return schedule.with_student_grid(shift=self.student_shift, timesteps=self.student_timesteps)

  @classmethod
  def from_config(cls, config) -> "TDMConfig":
    """From an ml_collections ConfigDict (or dict) of the same fields."""
    values = dict(config)
    values["step_choices"] = tuple(int(k) for k in values.get("step_choices", ()))
    values["step_weights"] = tuple(float(w) for w in values.get("step_weights", ()))
    values["student_timesteps"] = tuple(int(t) for t in values.get("student_timesteps", ()))
    return cls(**values)

  @property
  def step_conditioning(self) -> bool:
    return bool(self.step_choices)

  @property
  def all_step_counts(self) -> tuple:
    return tuple(self.step_choices) or (self.num_student_steps,)


# Answers the VP grid and draw questions of callers that pass no schedule (the rule needs no alphabar).
_VP_RULE = Schedule(np.ones((1,), np.float32), prediction_type="epsilon", num_train_timesteps=1)


def student_timesteps(total_steps: int, num_steps: int, schedule=None) -> np.ndarray:
  """tau_j for j = 0..K-1, highest first: the schedule's student grid (`Schedule.student_grid`: S - 1 - j S
  / K, or the given grid; a flow's N shift((K - j) / K)); without a schedule, the VP rule."""
  if schedule is None:
    return vp_student_grid(total_steps, num_steps)
  return schedule.student_grid(total_steps, num_steps)


def interval_lower_ends(total_steps: int, num_steps: int, schedule=None) -> np.ndarray:
  """m for each student timestep tau_j: one above the next student timestep (0 for the last); on a
  flow schedule the next student time itself."""
  if schedule is None:
    return np.append(vp_student_grid(total_steps, num_steps)[1:] + 1, 0).astype(np.int32)
  return schedule.interval_lower_ends(total_steps, num_steps)


def check_flow_grid(schedule, cfg: "TDMConfig") -> None:
  """Every student interval of the schedule's grid leaves room for the draws (a flow grid is checked by
  its schedule, a VP grid by TDMConfig itself)."""
  if schedule is not None:
    schedule.check_student_grid(cfg)


def _bcast(v: jax.Array, x: jax.Array) -> jax.Array:
  return jnp.reshape(v, v.shape + (1,) * (x.ndim - v.ndim))


def _mean_per_sample(x: jax.Array) -> jax.Array:
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def _batch_of(x: jax.Array, size: int, label: str):
  if x.shape[0] != size:
    raise ValueError(f"{label} has batch size {x.shape[0]}, expected {size}")


def predict(apply: Apply, params, schedule: Schedule, x_t, t, cond, **extra):
  """(x0, eps) from one network call, whatever its parameterisation."""
  return schedule.to_x0_eps(apply(params, x_t, t, cond, **extra), x_t, t)


def guided_predict(apply: Apply, params, schedule: Schedule, x_t, t, cond, uncond, scale: float, **extra):
  """Classifier-free guidance: (x0, eps) of uncond + w (cond - uncond).

  Both are linear in the network output, so guiding x0 or eps is the same move. The
  conditional and unconditional halves go through the network as one batch of 2B.
  """
  if uncond is None or scale == 1.0:
    return predict(apply, params, schedule, x_t, t, cond, **extra)
  both = jax.tree.map(lambda c, u: jnp.concatenate([c, u]), cond, uncond)
  extra2 = {name: jnp.concatenate([v, v]) for name, v in extra.items()}
  x0, eps = predict(apply, params, schedule, jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]), both, **extra2)
  guide = lambda v: (lambda c, u: u + scale * (c - u))(*jnp.split(v, 2))
  return guide(x0), guide(eps)


def guided_x0(apply: Apply, params, schedule: Schedule, x_t, t, cond, uncond, scale: float):
  """The teacher's guided x0: x0(uncond) + w (x0(cond) - x0(uncond))."""
  return guided_predict(apply, params, schedule, x_t, t, cond, uncond, scale)[0]


class Trajectory(NamedTuple):
  """The student's K-step DDIM rollout; index j is timestep tau_j (highest first)."""
  x: jax.Array  # (K, B, ...) the points x_{tau_j}
  x0: jax.Array  # (K, B, ...) the student's x0 prediction there
  eps: jax.Array  # (K, B, ...) and its eps
  timesteps: jax.Array  # (K,)

  @property
  def sample(self) -> jax.Array:
    """The rollout's output: the x0 of its last step."""
    return self.x0[-1]


def rollout(apply: Apply, params, schedule: Schedule, z, cond, timesteps, **extra) -> Trajectory:
  """Deterministic DDIM over `timesteps` from z (taken as x at timesteps[0]), without gradients; the
  trajectory in z's dtype (a bf16 network's predictions widened exactly). On a flow schedule the DDIM
  move is the flow ODE's Euler step."""
  params = jax.lax.stop_gradient(params)
  timesteps = jnp.asarray(timesteps, schedule.timestep_dtype)
  next_steps = jnp.append(timesteps[1:], -1)

  def step(x, ts):
    t, t_next = ts
    tb = jnp.full((x.shape[0],), t)
    x0, eps = predict(apply, params, schedule, x, tb, cond, **extra)
    return ddim_step(schedule, x0, eps, jnp.full_like(tb, t_next)), (x, x0.astype(x.dtype), eps.astype(x.dtype))

  _, (xs, x0s, epss) = jax.lax.scan(step, z, (timesteps, next_steps))
  return Trajectory(xs, x0s, epss, timesteps)


def rollout_first(apply: Apply, params, schedule: Schedule, z, cond, count, max_steps: int, total_steps: int,
                  **extra) -> Trajectory:
  """`rollout` on the student's grid for a traced K = count <= max_steps: max_steps slots, of which
  only the first K call the network (a `lax.cond` per slot); later slots hold zeros."""
  params = jax.lax.stop_gradient(params)
  taus, next_steps, _ = step_grid(total_steps, count, max_steps, schedule)

  def step(x, slot):
    j, t, t_next = slot

    def move(x):
      tb = jnp.full((x.shape[0],), t)
      x0, eps = predict(apply, params, schedule, x, tb, cond, **extra)
      # kept in x's dtype (eps comes in the network's, e.g. bf16), as `rollout` does and `skip` gives
      return ddim_step(schedule, x0, eps, jnp.full_like(tb, t_next)), (x, x0.astype(x.dtype), eps.astype(x.dtype))

    skip = lambda x: (x, (jnp.zeros_like(x),) * 3)
    return jax.lax.cond(j < count, move, skip, x)

  _, (xs, x0s, epss) = jax.lax.scan(step, z, (jnp.arange(max_steps), taus, next_steps))
  return Trajectory(xs, x0s, epss, taus)


class NoisySample(NamedTuple):
  """The step-aware noisy sample x_t of TDM.md, with what the losses need of it."""
  x_t: jax.Array
  t: jax.Array  # (B,)
  m: jax.Array  # (B,) the interval point the student's ODE was moved to
  noise: jax.Array  # n, the fresh noise of the forward diffusion
  effective_noise: jax.Array  # e, so that x_t = a_t x0_s + s_t e


class Segments(NamedTuple):
  """Which trajectory point each sample uses: j indexes the trajectory, k = K - j is TDM.md's k."""
  j: jax.Array
  k: jax.Array
  t_k: jax.Array
  m_k: jax.Array


def step_grid(total_steps: int, num_steps, length: int, schedule=None):
  """(tau_j, the rollout's next timestep, m_j) for j < length, from a K that may be traced (unified TDM):
  tau_j = S - 1 - j S / K, next = tau_{j+1} or -1 (x0) at the last, m_j = tau_{j+1} + 1 or 0; on a flow
  schedule tau_j = N shift((K - j) / K) and m_j = tau_{j+1} (or 0) as floats.
  Entries j >= K are not meaningful. Equal to `student_timesteps` / `interval_lower_ends`."""
  return (schedule or _VP_RULE).traced_student_grid(total_steps, num_steps, length)


def draw_segments(key, batch_size: int, total_steps: int, num_steps, max_steps: Optional[int] = None,
                  schedule=None) -> Segments:
  """k ~ U{1..K} per sample, with its timestep t_k and interval lower end m_k (a traced K needs
  `max_steps`, a bound on it)."""
  j = jax.random.randint(key, (batch_size,), 0, num_steps)
  taus, _, lows = step_grid(total_steps, num_steps, max_steps or num_steps, schedule)
  return Segments(j=j, k=num_steps - j, t_k=taus[j], m_k=lows[j])


def gather_points(stacked: jax.Array, j: jax.Array) -> jax.Array:
  """stacked (K, B, ...) -> (B, ...) taking point j[b] for sample b."""
  return jnp.take_along_axis(stacked, _bcast(j, stacked[0])[None], axis=0)[0]


class SampleDraws(NamedTuple):
  """The random part of a step-aware sample: the interval point m, the timestep t, the fresh noise n."""
  m: jax.Array
  t: jax.Array
  noise: jax.Array


def draw_sample(key, cfg: TDMConfig, seg: Segments, shape: tuple, dtype=jnp.float32, schedule=None) -> SampleDraws:
  """m (m_k, or U[m_k, t_k - mid_margin) with random_mid), t ~ U[max(min_timestep, m), hi) and n ~ N(0, I)
  for samples of `shape`; they depend on the segments alone, never on the networks. Integers on a VP
  schedule; on a flow schedule uniform floats, and "shared" mode's top is N - upper_margin."""
  b = shape[0]
  k_mid, k_t, k_n = jax.random.split(key, 3)
  grid = schedule or _VP_RULE
  draw = lambda k, lo, hi: grid.draw_timesteps(k, (b,), lo, hi)
  top = grid.draw_top(cfg.total_steps)
  m = seg.m_k
  if cfg.random_mid:
    m = draw(k_mid, seg.m_k, seg.t_k - cfg.mid_margin)
  if cfg.interval_mode == "separate":
    hi = seg.t_k - cfg.upper_margin
  else:
    hi = jnp.full((b,), top - cfg.upper_margin)
  t = draw(k_t, jnp.maximum(cfg.min_timestep, m), hi)
  return SampleDraws(m=m, t=t, noise=jax.random.normal(k_n, shape, dtype))


def noisy_sample_from(schedule: Schedule, x0_s, eps_s, draws: SampleDraws) -> NoisySample:
  """Move the student's prediction to m along its own ODE, then diffuse forward to t with n."""
  m, t, n = draws
  ratio, b_coef = diffusion_coefficients(schedule, m, t)  # x_t = ratio x_m + b n (schedules.diffuse)
  x_m = ddim_step(schedule, x0_s, eps_s, m)
  x_t = _bcast(ratio, x_m) * x_m + _bcast(b_coef, n) * n
  s_t, s_m = schedule.s(t), schedule.s(m)
  e = (_bcast(ratio * s_m, eps_s) * eps_s + _bcast(b_coef, n) * n) / _bcast(s_t, n)
  return NoisySample(x_t=x_t, t=t, m=m, noise=n, effective_noise=e)


def noisy_sample(key, schedule: Schedule, cfg: TDMConfig, x0_s, eps_s, seg: Segments) -> NoisySample:
  """Move the student's prediction to m along its own ODE, then diffuse forward to t."""
  return noisy_sample_from(schedule, x0_s, eps_s, draw_sample(key, cfg, seg, x0_s.shape, x0_s.dtype, schedule))


class IterationDraws(NamedTuple):
  """Every random number of one iteration at K = num_steps: the rollout's start z, and the segments and
  sample draws of the fake-score and generator updates. A function of the key and K only, so another
  implementation of the iteration can be handed the same numbers (benchmarks/torch_iteration.py)."""
  num_steps: Any
  z: jax.Array
  fake_segments: Segments
  fake_sample: SampleDraws
  generator_segments: Segments
  generator_sample: SampleDraws


def iteration_draws(cfg: TDMConfig, key, batch: int, sample_shape: tuple, num_steps=None,
                    schedule=None) -> IterationDraws:
  """The draws of the iteration with key `key`; K is `num_steps`, else drawn (`draw_step_count`) when
  `cfg.step_choices` is set, else `cfg.num_student_steps`. `schedule` matters only when it is a flow."""
  if num_steps is None:
    num_steps = draw_step_count(cfg, key) if cfg.step_choices else cfg.num_student_steps
  noise_key, fake_key, gen_key = (rng.role_key(key, r) for r in
                                  (rng.Role.STUDENT_NOISE, rng.Role.FAKE_SAMPLE, rng.Role.GENERATOR_SAMPLE))
  shape = (batch,) + tuple(sample_shape)
  out = [num_steps, jax.random.normal(noise_key, shape, jnp.float32)]
  for role_key in (fake_key, gen_key):
    seg_key, sample_key = jax.random.split(role_key)
    seg = draw_segments(seg_key, batch, cfg.total_steps, num_steps, max(cfg.all_step_counts), schedule)
    out += [seg, draw_sample(sample_key, cfg, seg, shape, schedule=schedule)]
  return IterationDraws(*out)


def importance_weight(effective_noise, noise) -> jax.Array:
  """w = exp(-mean(e^2)/2) / exp(-mean(n^2)/2) per sample, computed as one exponent."""
  return jnp.exp(0.5 * (_mean_per_sample(noise**2) - _mean_per_sample(effective_noise**2)))


def fake_score_weight(schedule: Schedule, cfg: TDMConfig, sample: NoisySample) -> jax.Array:
  """Per-sample weight of the fake-score loss: min-SNR times the importance weight."""
  w = jnp.ones(sample.t.shape, jnp.float32)
  if cfg.min_snr_gamma > 0:
    w = w * jnp.minimum(schedule.snr(sample.t), cfg.min_snr_gamma)
  if cfg.importance_weighting:
    w = w * importance_weight(sample.effective_noise, sample.noise)
  return jax.lax.stop_gradient(w)


def fake_score_loss(fake_params, fake_apply: Apply, schedule: Schedule, cfg: TDMConfig, x0_s,
                    sample: NoisySample, cond, **extra):
  """L_F = mean_b( mean|x0_F(x_t, t) - x0_s|^2 * min(snr, gamma) * w ); x0_s carries no gradient."""
  x0_f, _ = predict(fake_apply, fake_params, schedule, sample.x_t, sample.t, cond, **extra)
  weight = fake_score_weight(schedule, cfg, sample)
  per_sample = _mean_per_sample((x0_f.astype(jnp.float32) - jax.lax.stop_gradient(x0_s))**2)
  loss = jnp.mean(per_sample * weight)
  return loss, {"fake_loss": loss, "fake_weight": jnp.mean(weight)}


def generator_loss_from_target(x0_s, target, normalizer, cfg: TDMConfig):
  """Pseudo-Huber (or squared) distance of x0_s to a fixed target, per-sample normalised."""
  diff = x0_s.astype(jnp.float32) - target
  if cfg.loss_type == "huber":
    per_elem = jnp.sqrt(diff**2 + cfg.huber_c**2) - cfg.huber_c
    return jnp.mean(per_elem / _bcast(normalizer, diff))
  if cfg.loss_type == "huber_norm":
    c = cfg.huber_norm_coef * float(np.sqrt(np.prod(diff.shape[1:])))
    per_sample = jnp.sqrt(jnp.sum(diff**2, axis=tuple(range(1, diff.ndim))) + c**2) - c
    return jnp.mean(per_sample / normalizer)
  return jnp.mean(diff**2 / _bcast(normalizer, diff))


def generator_target(x0_s, x0_real, x0_fake, cfg: TDMConfig):
  """y = x0_s + (x0_real - x0_fake) and d = mean|x0_s - x0_real|, both without gradient."""
  sg = jax.lax.stop_gradient
  x0_s, x0_real, x0_fake = sg(x0_s).astype(jnp.float32), sg(x0_real).astype(jnp.float32), sg(x0_fake).astype(jnp.float32)
  target = x0_s + (x0_real - x0_fake)
  normalizer = jnp.maximum(_mean_per_sample(jnp.abs(x0_s - x0_real)), cfg.normalizer_floor)
  return target, normalizer


class Networks(NamedTuple):
  """Three roles, one call signature. Student and fake score default to the teacher's apply."""
  teacher: Apply
  student: Optional[Apply] = None
  fake: Optional[Apply] = None

  def resolved(self) -> "Networks":
    return Networks(self.teacher, self.student or self.teacher, self.fake or self.teacher)


class TDMState(NamedTuple):
  """What trains: student and fake score with their optimiser states (and an optional EMA)."""
  step: jax.Array
  student_params: PyTree
  fake_params: PyTree
  student_opt_state: PyTree
  fake_opt_state: PyTree
  ema_params: PyTree = None


def init_state(student_params, fake_params, student_tx: optax.GradientTransformation,
               fake_tx: optax.GradientTransformation, use_ema: bool = False) -> TDMState:
  """Student and fake score start as (copies of) the teacher's parameters."""
  copy = lambda tree: jax.tree.map(jnp.array, tree)
  student_params, fake_params = copy(student_params), copy(fake_params)
  return TDMState(step=jnp.zeros((), jnp.int32), student_params=student_params, fake_params=fake_params,
                  student_opt_state=student_tx.init(student_params), fake_opt_state=fake_tx.init(fake_params),
                  ema_params=copy(student_params) if use_ema else None)


def _extras(cfg: TDMConfig, num_steps, batch: int, seg: Optional[Segments] = None, fake=False):
  extra = {}
  if cfg.step_conditioning:
    extra["num_steps"] = jnp.full((batch,), num_steps, jnp.int32)
  if fake and cfg.condition_fake_on_segment and seg is not None:
    extra["segment"] = seg.k
  return extra


def _iteration_for_k(num_steps, state: TDMState, teacher_params, cond, uncond, key, *, nets: Networks,
                     schedule: Schedule, cfg: TDMConfig, student_tx, fake_tx, sample_shape: tuple,
                     ema_decay: float):
  """One TDM iteration at K = num_steps (an int, or traced for unified TDM): rollout, fake-score
  update, then generator update."""
  nets = nets.resolved()
  sg = jax.lax.stop_gradient
  batch = jax.tree.leaves(cond)[0].shape[0]
  jax.tree.map(lambda u: _batch_of(u, batch, "the unconditional input"), uncond)
  draws = iteration_draws(cfg, key, batch, sample_shape, num_steps, schedule)
  student_extra = _extras(cfg, num_steps, batch)

  # 1. The student's K-step trajectory, once for the whole batch, without gradients.
  if isinstance(num_steps, int):
    traj = rollout(nets.student, state.student_params, schedule, draws.z, cond,
                   student_timesteps(cfg.total_steps, num_steps, schedule), **student_extra)
  else:
    traj = rollout_first(nets.student, state.student_params, schedule, draws.z, cond, num_steps,
                         max(cfg.all_step_counts), cfg.total_steps, **student_extra)

  # 2. Fake-score update on a step-aware sample built from the rollout's own predictions.
  seg = draws.fake_segments
  x0_s, eps_s = gather_points(traj.x0, seg.j), gather_points(traj.eps, seg.j)
  sample = noisy_sample_from(schedule, x0_s, eps_s, draws.fake_sample)
  (fake_loss, fake_aux), fake_grads = jax.value_and_grad(fake_score_loss, has_aux=True)(
      state.fake_params, nets.fake, schedule, cfg, x0_s, sample, cond,
      **_extras(cfg, num_steps, batch, seg, fake=True))
  updates, fake_opt_state = fake_tx.update(fake_grads, state.fake_opt_state, state.fake_params)
  fake_params = optax.apply_updates(state.fake_params, updates)

  # 3. Generator update on a fresh sample; gradient only through the student's x0 at (x_k, t_k).
  seg = draws.generator_segments
  x_k = gather_points(traj.x, seg.j)
  student_fn = lambda p: predict(nets.student, p, schedule, x_k, seg.t_k, cond, **student_extra)
  (x0_s, eps_s), student_vjp = jax.vjp(student_fn, state.student_params)
  sample = noisy_sample_from(schedule, sg(x0_s), sg(eps_s), draws.generator_sample)
  x0_real = guided_x0(nets.teacher, teacher_params, schedule, sample.x_t, sample.t, cond, uncond,
                      cfg.guidance_scale)
  x0_fake, _ = predict(nets.fake, fake_params, schedule, sample.x_t, sample.t, cond,
                       **_extras(cfg, num_steps, batch, seg, fake=True))
  target, normalizer = generator_target(x0_s, x0_real, x0_fake, cfg)
  gen_loss, grad_x0 = jax.value_and_grad(generator_loss_from_target)(x0_s, target, normalizer, cfg)
  (student_grads,) = student_vjp((grad_x0, jnp.zeros_like(eps_s)))
  updates, student_opt_state = student_tx.update(student_grads, state.student_opt_state, state.student_params)
  student_params = optax.apply_updates(state.student_params, updates)

  ema_params = state.ema_params
  if ema_params is not None:
    ema_params = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema_params, student_params)
  new_state = TDMState(step=state.step + 1, student_params=student_params, fake_params=fake_params,
                       student_opt_state=student_opt_state, fake_opt_state=fake_opt_state, ema_params=ema_params)
  metrics = {
      **fake_aux,
      "generator_loss": gen_loss,
      "normalizer": jnp.mean(normalizer),
      "student_grad_norm": optax.tree.norm(student_grads),
      "fake_grad_norm": optax.tree.norm(fake_grads),
      "num_steps": jnp.asarray(num_steps, jnp.float32),
  }
  return new_state, metrics


def draw_step_count(cfg: TDMConfig, key: jax.Array) -> jax.Array:
  """Unified TDM's K of the iteration with key `key`: one of `cfg.step_choices`, with the odds of
  `cfg.step_weights` (uniform when empty), as a traced int32."""
  step_key = rng.role_key(key, rng.Role.STEP_COUNT)
  counts = jnp.asarray(cfg.step_choices, jnp.int32)
  if cfg.step_weights:
    odds = np.asarray(cfg.step_weights, np.float32)
    return counts[jax.random.choice(step_key, len(cfg.step_choices), p=jnp.asarray(odds / odds.sum()))]
  return counts[jax.random.randint(step_key, (), 0, len(cfg.step_choices))]


def tdm_iteration(state: TDMState, teacher_params, cond, uncond, key, *, nets: Networks, schedule: Schedule,
                  cfg: TDMConfig, student_tx: optax.GradientTransformation, fake_tx: optax.GradientTransformation,
                  sample_shape: tuple, ema_decay: float = 0.0):
  """One full TDM iteration. Pure: jit it with everything after `key` static (functools.partial).

  cond / uncond: conditioning pytrees with a leading batch axis (uncond is what the teacher's
  classifier-free guidance contrasts with). key: this iteration's key (see rng.iteration_key).
  With `cfg.step_choices`, K is drawn per iteration (`draw_step_count`) and is a traced value of the
  one program: the rollout has max K slots of which the first K run, and every grid is computed from
  K, so the iteration compiles once, holds one copy of the networks' code, and costs what its K costs.
  """
  check_flow_grid(schedule, cfg)
  body = functools.partial(_iteration_for_k, nets=nets, schedule=schedule, cfg=cfg, student_tx=student_tx,
                           fake_tx=fake_tx, sample_shape=tuple(sample_shape), ema_decay=ema_decay)
  counts = cfg.all_step_counts
  if len(counts) == 1:
    return body(counts[0], state, teacher_params, cond, uncond, key)
  return body(draw_step_count(cfg, key), state, teacher_params, cond, uncond, key)
