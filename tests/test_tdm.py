"""Tests of the TDM kernels (tdm_jax/core/tdm.py) against TDM.md, on tiny pure-jnp models.

The model is `apply(params, x_t, t, cond, num_steps=None, segment=None)`: a linear/tanh map of the
flattened x_t plus embeddings of t, of the label and of a conditioning vector (and optionally of
the step count / segment); it works for any sample shape (B, ...). Sample shapes (B, 3) and
(B, 2, 4, 4) are both used; the conditioning is the pytree {"label": int (B,), "vec": float (B, 5)}.

XLA compile time dominates on CPU, so programs are compiled once per configuration (module-scoped
fixtures) and with a low XLA optimisation level (`jit` below); results are unaffected.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tdm_jax.core import rng, tdm
from tdm_jax.core.schedules import ddim_step, make_schedule

NUM_LABELS = 4  # label NUM_LABELS is the "null" (unconditional) label
VEC_DIM = 5
SHAPES = [(3,), (2, 4, 4)]
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def jit(fun, **kw):
  return jax.jit(fun, compiler_options=FAST_COMPILE, **kw)


# ----------------------------------------------------------------------------- tiny model

def normal(seed, shape, scale=1.0):
  """Test data from NumPy (eager jax.random would compile a program per shape)."""
  return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def init_params(seed, sample_shape, extras=True):
  """extras: embeddings of the step count and the segment (unused unless passed to apply)."""
  d = int(np.prod(sample_shape))
  params = {
      "w": normal((seed, 0), (d, d), 0.5 / np.sqrt(d)),
      "t_emb": normal((seed, 1), (8, d), 0.3),
      "label": normal((seed, 2), (NUM_LABELS + 1, d), 0.3),
      "vec": normal((seed, 3), (VEC_DIM, d), 0.3),
      "skip": jnp.full((), 0.3, jnp.float32),
  }
  if extras:
    params["steps"] = normal((seed, 4), (9, d), 0.2)
    params["segment"] = normal((seed, 5), (9, d), 0.2)
  return params


def perturb(params, seed, size):
  leaves, treedef = jax.tree.flatten(params)
  return jax.tree.unflatten(treedef, [p + normal((seed, i), p.shape, size) for i, p in enumerate(leaves)])


def apply(params, x_t, t, cond, num_steps=None, segment=None):
  b = x_t.shape[0]
  h = x_t.reshape(b, -1)
  tf = jnp.asarray(t, jnp.float32)[:, None] / 1000.0
  freqs = jnp.arange(1, 5, dtype=jnp.float32)[None] * np.pi
  temb = jnp.concatenate([jnp.sin(tf * freqs), jnp.cos(tf * freqs)], axis=-1)
  c = temb @ params["t_emb"] + params["label"][cond["label"]] + cond["vec"] @ params["vec"]
  if num_steps is not None:
    c = c + params["steps"][num_steps]
  if segment is not None:
    c = c + params["segment"][segment]
  out = jnp.tanh(h @ params["w"] + c) + params["skip"] * h
  return out.reshape(x_t.shape)


def strict_apply(need_steps=False, need_segment=False):
  """`apply` that insists on being given the step count / segment (checked at trace time)."""

  def f(params, x_t, t, cond, num_steps=None, segment=None):
    b = x_t.shape[0]
    if need_steps:
      assert num_steps is not None and num_steps.shape == (b,), "num_steps not passed"
    if need_segment:
      assert segment is not None and segment.shape == (b,), "segment not passed"
    return apply(params, x_t, t, cond, num_steps=num_steps, segment=segment)

  return f


def student_net(p, x_t, t, cond, **kw):
  """A student whose parameter tree differs from the teacher's (a gain on top of its own copy)."""
  return p["gain"] * apply(p["net"], x_t, t, cond, **kw)


def make_cond(seed, b):
  labels = np.random.default_rng(seed).integers(0, NUM_LABELS, b)
  labels[:NUM_LABELS] = np.arange(min(b, NUM_LABELS))  # every label present
  cond = {"label": jnp.asarray(labels, jnp.int32), "vec": normal((seed, 1), (b, VEC_DIM))}
  uncond = {"label": jnp.full((b,), NUM_LABELS, jnp.int32), "vec": jnp.zeros((b, VEC_DIM), jnp.float32)}
  return cond, uncond


def recording_tx(lr=1e-2):
  """SGD whose state keeps the last gradient it was given (so it comes back in the new TDMState).

  The learning rate lives in the state too, so it can be changed without recompiling.
  """

  def init(params):
    return {"lr": jnp.asarray(lr, jnp.float32), "grads": jax.tree.map(jnp.zeros_like, params)}

  def update(grads, state, params=None):
    del params
    return jax.tree.map(lambda g: -state["lr"] * g, grads), {"lr": state["lr"], "grads": grads}

  return optax.GradientTransformation(init, update)


def leaves_np(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def assert_trees_equal_bitwise(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(leaves_np(a), leaves_np(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    assert np.array_equal(x, y), "trees differ"


def max_abs(tree):
  return max(float(np.max(np.abs(x))) for x in leaves_np(tree))


def tree_norm(tree):
  return float(np.sqrt(sum(np.sum(np.asarray(x, np.float64)**2) for x in jax.tree.leaves(tree))))


@pytest.fixture(scope="module")
def sched():
  return make_schedule()  # scaled_linear, epsilon prediction


NOISY = jit(tdm.noisy_sample, static_argnums=2)


# ----------------------------------------------------------------------------- 1. What must hold

def _generator_part(sched, student, teacher, fake, cond, uncond, key, *, cfgs, sample_shape):
  """The generator part of a TDM iteration, as tdm does it: vjp through predict, then the loss.

  Returns, for each cfg, (x0_s, target, normalizer, student gradient).
  """
  b = cond["label"].shape[0]
  k_z, k_seg, k_s = jax.random.split(key, 3)
  z = jax.random.normal(k_z, (b,) + sample_shape)
  k = cfgs[0].num_student_steps
  traj = tdm.rollout(apply, student, sched, z, cond, tdm.student_timesteps(cfgs[0].total_steps, k))
  seg = tdm.draw_segments(k_seg, b, cfgs[0].total_steps, k)
  x_k = tdm.gather_points(traj.x, seg.j)
  fn = lambda p: tdm.predict(apply, p, sched, x_k, seg.t_k, cond)
  (x0_s, eps_s), vjp = jax.vjp(fn, student)
  # The cfgs differ only in loss and guidance, so they share one step-aware sample.
  sample = tdm.noisy_sample(k_s, sched, cfgs[0], jax.lax.stop_gradient(x0_s), jax.lax.stop_gradient(eps_s), seg)
  out = []
  for cfg in cfgs:
    x0_real = tdm.guided_x0(apply, teacher, sched, sample.x_t, sample.t, cond, uncond, cfg.guidance_scale)
    x0_fake, _ = tdm.predict(apply, fake, sched, sample.x_t, sample.t, cond)
    target, normalizer = tdm.generator_target(x0_s, x0_real, x0_fake, cfg)
    g_x0 = jax.grad(tdm.generator_loss_from_target)(x0_s, target, normalizer, cfg)
    (grads,) = vjp((g_x0, jnp.zeros_like(eps_s)))
    out.append((x0_s, target, normalizer, grads))
  return out


@pytest.mark.parametrize("sample_shape", [(3,)])  # (2, 4, 4): test_generator_direction_in_full_iteration
def test_generator_direction_zero_when_fake_equals_teacher(sched, sample_shape):
  """TDM.md: with F = T and w_cfg = 1 the target is x0_s, so the student gradient vanishes."""
  w1 = [tdm.TDMConfig(guidance_scale=1.0, loss_type=lt) for lt in ("huber", "huber_norm", "l2")]
  w2 = tdm.TDMConfig(guidance_scale=2.0)
  part = jit(functools.partial(_generator_part, cfgs=tuple(w1) + (w2,), sample_shape=sample_shape))
  teacher = init_params(0, sample_shape)
  student = perturb(teacher, 1, 0.05)  # any student: the claim is about F and T only
  cond, uncond = make_cond(2, 16)
  k_run = jax.random.key(0)

  results = part(sched, student, teacher, teacher, cond, uncond, k_run)
  for cfg, (x0_s, target, normalizer, grads) in zip(w1, results[:3]):
    np.testing.assert_array_equal(np.asarray(target), np.asarray(x0_s), err_msg=cfg.loss_type)
    assert np.all(np.asarray(normalizer) > 1e-4)  # a real normaliser, not the floor
    assert jax.tree.structure(grads) == jax.tree.structure(student)
    assert max_abs(grads) < 1e-7, cfg.loss_type
  # Guidance w != 1 with F == T does pull the student.
  x0_s, target, _, grads = results[3]
  assert float(jnp.max(jnp.abs(target - x0_s))) > 1e-2
  assert tree_norm(grads) > 1e-2

  # Converse: a fake score that differs from the teacher pulls the student, whatever the loss.
  fake = perturb(teacher, 3, 0.1)
  for cfg, (x0_s, target, _, grads) in zip(w1, part(sched, student, teacher, fake, cond, uncond, k_run)[:3]):
    assert float(jnp.max(jnp.abs(target - x0_s))) > 1e-2
    assert tree_norm(grads) > 1e-2, cfg.loss_type


@pytest.fixture(scope="module")
def iteration_setup(sched):
  """A (2, 4, 4) TDM iteration with w_cfg = 1, a student of its own tree structure, recording optimisers."""
  shape, b = (2, 4, 4), 8
  teacher = init_params(10, shape, extras=False)
  student = {"net": perturb(teacher, 11, 0.05), "gain": jnp.ones((), jnp.float32)}
  cond, uncond = make_cond(12, b)
  cfg = tdm.TDMConfig(guidance_scale=1.0)
  tx = recording_tx()
  state = tdm.init_state(student, teacher, tx, tx)
  run = functools.partial(tdm.tdm_iteration, nets=tdm.Networks(apply, student=student_net), schedule=sched,
                          cfg=cfg, student_tx=tx, fake_tx=tx, sample_shape=shape)
  with_fake_lr = lambda lr: state._replace(fake_opt_state={**state.fake_opt_state, "lr": jnp.float32(lr)})
  return dict(run=run, step=jit(run), state=with_fake_lr, teacher=teacher, cond=cond, uncond=uncond,
              key=rng.iteration_key(0, 3))


def test_generator_direction_in_full_iteration(iteration_setup):
  """In tdm_iteration itself: F = T kept frozen (fake lr 0) and w = 1 give a zero student gradient."""
  s = iteration_setup
  new_state, metrics = s["step"](s["state"](0.0), s["teacher"], s["cond"], s["uncond"], s["key"])
  assert float(metrics["fake_grad_norm"]) > 1e-4  # the fake score did get a gradient, unused
  assert float(metrics["student_grad_norm"]) < 1e-7
  assert max_abs(new_state.student_opt_state["grads"]) < 1e-7
  # The fake score moves away from the teacher first: now the student is pulled.
  _, metrics = s["step"](s["state"](1.0), s["teacher"], s["cond"], s["uncond"], s["key"])
  assert float(metrics["student_grad_norm"]) > 1e-4


def test_importance_weight_is_one_for_same_draw():
  n = normal(20, (6, 2, 4, 4))
  w = tdm.importance_weight(n, n)
  assert w.shape == (6,)
  np.testing.assert_array_equal(np.asarray(w), np.ones(6, np.float32))
  # Not a constant: e = 2n gives exp(-3/2 mean(n^2)) per sample.
  w2 = np.asarray(tdm.importance_weight(2 * n, n))
  expect = np.exp(-1.5 * np.mean(np.asarray(n, np.float64)**2, axis=(1, 2, 3)))
  np.testing.assert_allclose(w2, expect, rtol=1e-5)
  assert np.all(w2 < 0.9)


def fixed_x0(p, x_t, t, cond):
  """A sample-parameterised 'network' that predicts the fixed x0 in its parameters."""
  return jnp.broadcast_to(p["x0"], x_t.shape)


FAKE_LOSS = jit(jax.value_and_grad(tdm.fake_score_loss, has_aux=True), static_argnums=(1, 3))


@pytest.mark.parametrize("sample_shape", [(2, 4, 4)])
def test_fake_score_loss_zero_when_prediction_matches(sample_shape):
  sched = make_schedule(prediction_type="sample")
  b = 32
  k2, k3 = jax.random.split(jax.random.key(3))
  x0_s = normal(30, (b,) + sample_shape)
  eps_s = normal(31, (b,) + sample_shape)
  cfg = tdm.TDMConfig()
  seg = tdm.draw_segments(k2, b, cfg.total_steps, cfg.num_student_steps)
  sample = NOISY(k3, sched, cfg, x0_s, eps_s, seg)

  (loss, aux), grads = FAKE_LOSS({"x0": x0_s}, fixed_x0, sched, cfg, x0_s, sample, None)
  assert float(loss) == 0.0 and float(aux["fake_loss"]) == 0.0
  assert max_abs(grads) == 0.0

  # Off by delta: the loss is mean_b(delta^2 * min(snr, 5) * w), by hand.
  delta = 0.1
  (loss, aux), grads = FAKE_LOSS({"x0": x0_s + delta}, fixed_x0, sched, cfg, x0_s, sample, None)
  ab = np.asarray(sched.alphas_cumprod, np.float64)[np.asarray(sample.t)]
  snr = np.minimum(ab / (1 - ab), 5.0)
  red = tuple(range(1, x0_s.ndim))
  w = np.exp(-np.mean(np.asarray(sample.effective_noise, np.float64)**2, axis=red) / 2) / np.exp(
      -np.mean(np.asarray(sample.noise, np.float64)**2, axis=red) / 2)
  assert w.std() > 1e-3  # the importance weights are not all 1 here
  np.testing.assert_allclose(float(loss), np.mean(delta**2 * snr * w), rtol=1e-4)
  np.testing.assert_allclose(float(aux["fake_weight"]), np.mean(snr * w), rtol=1e-4)
  assert max_abs(grads) > 0


def _fixed_segments(j, b, cfg):
  taus = tdm.student_timesteps(cfg.total_steps, cfg.num_student_steps)
  lows = tdm.interval_lower_ends(cfg.total_steps, cfg.num_student_steps)
  jj = jnp.full((b,), j, jnp.int32)
  return tdm.Segments(j=jj, k=cfg.num_student_steps - jj, t_k=jnp.asarray(taus)[jj], m_k=jnp.asarray(lows)[jj])


@pytest.mark.parametrize("random_mid", [False, True])
def test_forward_diffusion_preserves_marginal_variance(sched, random_mid):
  """x0_s of variance v and eps_s ~ N(0, I) put x_m at noise level m; x_t must have a_t^2 v + s_t^2."""
  cfg = tdm.TDMConfig(random_mid=random_mid)
  b, d, v = 4096, 16, 2.0
  for j in range(cfg.num_student_steps):
    k2 = jax.random.fold_in(jax.random.key(4), j)
    x0_s = normal((40, j), (b, d), np.sqrt(v))
    eps_s = normal((41, j), (b, d))
    s = tdm.noisy_sample(k2, sched, cfg, x0_s, eps_s, _fixed_segments(j, b, cfg))
    ab = np.asarray(sched.alphas_cumprod, np.float64)
    ab_t, ab_m = ab[np.asarray(s.t)], ab[np.asarray(s.m)]
    a_t, s_t = np.sqrt(ab_t), np.sqrt(1 - ab_t)
    expect = a_t**2 * v + s_t**2
    sq = np.mean(np.asarray(s.x_t, np.float64)**2, axis=1)
    # Overall in this segment, and in each quarter of the drawn-t range.
    np.testing.assert_allclose(sq.mean(), expect.mean(), rtol=0.03)
    t = np.asarray(s.t)
    edges = np.quantile(t, [0, 0.25, 0.5, 0.75, 1.0])
    for lo, hi in zip(edges[:-1], edges[1:]):
      sel = (t >= lo) & (t <= hi)
      assert sel.sum() > 500
      np.testing.assert_allclose(sq[sel].mean(), expect[sel].mean(), rtol=0.03)
    np.testing.assert_allclose(np.mean(sq / expect), 1.0, atol=0.03)  # standardised: unit variance

    # x_t = a_t x0_s + s_t e (up to float32 rounding).
    recon = a_t[:, None] * np.asarray(x0_s, np.float64) + s_t[:, None] * np.asarray(s.effective_noise, np.float64)
    np.testing.assert_allclose(np.asarray(s.x_t), recon, atol=1e-5, rtol=1e-5)
    # and x_t is the forward diffusion of x_m = ddim(x0_s, eps_s, m) with the fresh noise n.
    x_m = np.asarray(ddim_step(sched, x0_s, eps_s, s.m), np.float64)
    np.testing.assert_allclose(x_m, np.sqrt(ab_m)[:, None] * np.asarray(x0_s) + np.sqrt(1 - ab_m)[:, None]
                               * np.asarray(eps_s), atol=1e-5, rtol=1e-5)
    ratio = np.sqrt(ab_t / ab_m)
    bcoef = np.sqrt(1 - ab_t / ab_m)  # = sqrt(s_t^2 - ratio^2 s_m^2), without the cancellation
    want = ratio[:, None] * x_m + bcoef[:, None] * np.asarray(s.noise)
    later = t > np.asarray(s.m)
    np.testing.assert_allclose(np.asarray(s.x_t)[later], want[later], atol=1e-5, rtol=1e-5)
    # t == m is drawable (t ~ U[max(20, m), hi)); then x_t should be x_m, but under jit b = sqrt(s_t^2 -
    # (a_t/a_m)^2 s_m^2) cancels to ~5e-4 instead of 0 (float32), hence the looser tolerance there.
    np.testing.assert_allclose(np.asarray(s.x_t)[~later], want[~later], atol=5e-3)
    # The fresh noise is fresh: uncorrelated with eps_s, unit variance.
    assert abs(np.corrcoef(np.asarray(s.noise).ravel(), np.asarray(eps_s).ravel())[0, 1]) < 0.02
    np.testing.assert_allclose(np.var(np.asarray(s.noise)), 1.0, atol=0.03)


@pytest.fixture(scope="module")
def determinism_setup(sched):
  shape, b = (3,), 8
  teacher = init_params(50, shape)
  cond, uncond = make_cond(51, b)
  cfg = tdm.TDMConfig(random_mid=True)
  student_tx = optax.adamw(1e-3, b1=0.0, b2=0.95, weight_decay=1e-2)
  fake_tx = optax.adamw(1e-2, b1=0.0, b2=0.95, weight_decay=1e-2)
  state = tdm.init_state(perturb(teacher, 52, 0.02), teacher, student_tx, fake_tx)
  step = jit(functools.partial(tdm.tdm_iteration, nets=tdm.Networks(apply), schedule=sched, cfg=cfg,
                               student_tx=student_tx, fake_tx=fake_tx, sample_shape=shape))
  return state, teacher, cond, uncond, step


def test_draws_are_a_function_of_seed_and_step(determinism_setup):
  state, teacher, cond, uncond, step = determinism_setup
  out1 = step(state, teacher, cond, uncond, rng.iteration_key(11, 7))
  out2 = step(state, teacher, cond, uncond, rng.iteration_key(11, 7))
  assert_trees_equal_bitwise(out1, out2)

  for other in (step(state, teacher, cond, uncond, rng.iteration_key(11, 8)),
                step(state, teacher, cond, uncond, rng.iteration_key(12, 7))):
    assert not np.array_equal(np.asarray(other[0].student_params["w"]), np.asarray(out1[0].student_params["w"]))
    assert not np.array_equal(np.asarray(other[0].fake_params["w"]), np.asarray(out1[0].fake_params["w"]))
    assert float(other[1]["generator_loss"]) != float(out1[1]["generator_loss"])
    assert float(other[1]["fake_loss"]) != float(out1[1]["fake_loss"])

  # A resumed run (state through host memory, as from a checkpoint) repeats the uninterrupted one.
  s1, _ = step(state, teacher, cond, uncond, rng.iteration_key(11, 0))
  s2, m2 = step(s1, teacher, cond, uncond, rng.iteration_key(11, 1))
  restored = jax.tree.map(lambda x: jnp.asarray(np.array(x)), s1)
  s2r, m2r = step(restored, teacher, cond, uncond, rng.iteration_key(11, 1))
  assert_trees_equal_bitwise((s2, m2), (s2r, m2r))


# ----------------------------------------------------------------------------- 2. gradients on the trees

def test_gradients_reach_only_their_own_tree(iteration_setup):
  s = iteration_setup
  state, teacher, cond, uncond, key = s["state"](1.0), s["teacher"], s["cond"], s["uncond"], s["key"]
  teacher_before = leaves_np(teacher)

  new_state, metrics = s["step"](state, teacher, cond, uncond, key)
  student_g, fake_g = new_state.student_opt_state["grads"], new_state.fake_opt_state["grads"]
  assert jax.tree.structure(student_g) == jax.tree.structure(state.student_params)
  assert jax.tree.structure(fake_g) == jax.tree.structure(state.fake_params) == jax.tree.structure(teacher)
  assert max_abs(student_g) > 1e-4 and max_abs(fake_g) > 1e-4
  assert float(jnp.abs(student_g["gain"])) > 0  # the student's own extra leaf gets gradient

  # d(losses)/d(teacher, student, fake) of one whole iteration: rows (generator_loss, fake_loss).
  def losses(tp, sp, fp):
    m = s["run"](state._replace(student_params=sp, fake_params=fp), tp, cond, uncond, key)[1]
    return jnp.stack([m["generator_loss"], m["fake_loss"]])

  g_teacher, g_student, g_fake = jit(jax.jacrev(losses, argnums=(0, 1, 2)))(
      teacher, state.student_params, state.fake_params)
  row = lambda tree, i: jax.tree.map(lambda x: x[i], tree)
  assert max_abs(row(g_teacher, 0)) == 0.0  # generator loss: not into the teacher,
  assert max_abs(row(g_fake, 0)) == 0.0  # not into the fake score,
  assert max_abs(row(g_student, 1)) == 0.0  # fake loss: not into the student (nor via x_t),
  assert max_abs(row(g_teacher, 1)) == 0.0  # nor into the teacher.
  # The gradient each optimiser received is the gradient of its own loss, and is non-zero.
  for got, want in ((student_g, row(g_student, 0)), (fake_g, row(g_fake, 1))):
    for x, y in zip(leaves_np(got), leaves_np(want)):
      np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5 * np.abs(y).max())
  np.testing.assert_allclose(float(metrics["student_grad_norm"]), tree_norm(student_g), rtol=1e-4)
  np.testing.assert_allclose(float(metrics["fake_grad_norm"]), tree_norm(fake_g), rtol=1e-4)

  # The teacher is left as it was and is returned nowhere; student and fake score did move.
  for before, after in zip(teacher_before, leaves_np(teacher)):
    np.testing.assert_array_equal(before, after)
  for leaf in leaves_np(new_state):
    assert not any(leaf.shape == t.shape and np.array_equal(leaf, t) for t in teacher_before)
  assert not np.array_equal(np.asarray(new_state.fake_params["w"]), np.asarray(state.fake_params["w"]))
  assert not np.array_equal(np.asarray(new_state.student_params["net"]["w"]),
                            np.asarray(state.student_params["net"]["w"]))


# ----------------------------------------------------------------------------- 3. student timesteps

def test_student_timesteps_and_interval_ends():
  assert tdm.student_timesteps(800, 4).tolist() == [799, 599, 399, 199]
  assert tdm.interval_lower_ends(800, 4).tolist() == [600, 400, 200, 0]
  assert tdm.student_timesteps(900, 4).tolist() == [899, 674, 449, 224]
  assert tdm.interval_lower_ends(900, 4).tolist() == [675, 450, 225, 0]
  assert tdm.student_timesteps(800, 1).tolist() == [799]
  assert tdm.interval_lower_ends(800, 1).tolist() == [0]


@pytest.mark.parametrize("s,k", [(800, 4), (900, 4), (1000, 8), (800, 2), (800, 1)])
def test_draw_segments_match_spec(s, k):
  b = 4000
  seg = tdm.draw_segments(jax.random.key(7), b, s, k)
  kk, j = np.asarray(seg.k), np.asarray(seg.j)
  np.testing.assert_array_equal(kk, k - j)
  assert set(kk.tolist()) == set(range(1, k + 1))  # every k in 1..K drawn
  np.testing.assert_array_equal(np.asarray(seg.t_k), kk * s // k - 1)  # t_k = k S/K - 1
  np.testing.assert_array_equal(np.asarray(seg.m_k), (kk - 1) * s // k)  # m_k = (k-1) S/K
  np.testing.assert_array_equal(np.asarray(seg.t_k), tdm.student_timesteps(s, k)[j])  # x_k is trajectory point j
  counts = np.bincount(kk, minlength=k + 1)[1:]
  assert counts.min() > 0.7 * b / k  # roughly uniform


@pytest.mark.parametrize("mode", ["separate", "shared"])
@pytest.mark.parametrize("random_mid", [False, True])
def test_noisy_sample_timestep_ranges(sched, mode, random_mid):
  cfg = tdm.TDMConfig(interval_mode=mode, random_mid=random_mid)
  b = 4096  # eager, with the shapes of the variance test (shares its per-op compilations)
  k0, k1 = jax.random.split(jax.random.key(8))
  seg = tdm.draw_segments(k0, b, cfg.total_steps, cfg.num_student_steps)
  zeros = jnp.zeros((b, 16))
  s = tdm.noisy_sample(k1, sched, cfg, zeros, zeros, seg)
  t, m, t_k, m_k = (np.asarray(x) for x in (s.t, s.m, seg.t_k, seg.m_k))
  if random_mid:
    assert np.all(m >= m_k) and np.all(m < t_k - cfg.mid_margin)
    assert np.mean(m > m_k) > 0.9
  else:
    np.testing.assert_array_equal(m, m_k)
  assert np.all(t >= np.maximum(cfg.min_timestep, m))
  hi = t_k - cfg.upper_margin if mode == "separate" else np.full(b, cfg.total_steps - cfg.upper_margin)
  assert np.all(t < hi)
  if mode == "shared":
    assert np.mean(t > t_k) > 0.2  # the shared range really reaches past a segment's own t_k
  # The ends of the range are reached.
  assert np.any(t == np.maximum(cfg.min_timestep, m)) and np.any(t == hi - 1)
  if not random_mid:
    assert np.min(t[np.asarray(seg.k) == 1]) == cfg.min_timestep


# ----------------------------------------------------------------------------- 4. loss forms, config

def test_generator_loss_forms_by_hand():
  rs = np.random.default_rng(0)
  x0 = rs.standard_normal((3, 2, 2)).astype(np.float32)
  target = (x0 + 0.3 * rs.standard_normal((3, 2, 2))).astype(np.float32)
  target[0] = x0[0] + 1e-4  # a sample inside the Huber floor
  d = np.array([0.5, 1.0, 2.0], np.float32)
  diff = x0.astype(np.float64) - target

  c = 0.5
  got = tdm.generator_loss_from_target(x0, target, d, tdm.TDMConfig(loss_type="huber", huber_c=c))
  want = np.mean((np.sqrt(diff**2 + c**2) - c) / d[:, None, None])
  np.testing.assert_allclose(float(got), want, rtol=1e-5)

  coef = 0.3
  got_n = tdm.generator_loss_from_target(x0, target, d, tdm.TDMConfig(loss_type="huber_norm", huber_norm_coef=coef))
  cn = coef * np.sqrt(4)  # coef * sqrt(elements per sample)
  want_n = np.mean((np.sqrt(np.sum(diff**2, axis=(1, 2)) + cn**2) - cn) / d)
  np.testing.assert_allclose(float(got_n), want_n, rtol=1e-5)

  got_l2 = tdm.generator_loss_from_target(x0, target, d, tdm.TDMConfig(loss_type="l2"))
  want_l2 = np.mean(diff**2 / d[:, None, None])
  np.testing.assert_allclose(float(got_l2), want_l2, rtol=1e-5)
  assert len({round(float(v), 6) for v in (got, got_n, got_l2)}) == 3

  # Demo default c = 1e-3.
  got_def = tdm.generator_loss_from_target(x0, target, d, tdm.TDMConfig())
  want_def = np.mean((np.sqrt(diff**2 + 1e-6) - 1e-3) / d[:, None, None])
  np.testing.assert_allclose(float(got_def), want_def, rtol=1e-4)

  # generator_target: y = x0_s + (x0_real - x0_fake), d = mean|x0_s - x0_real|, floored.
  real = rs.standard_normal((3, 2, 2)).astype(np.float32)
  fake = rs.standard_normal((3, 2, 2)).astype(np.float32)
  y, dd = tdm.generator_target(x0, real, fake, tdm.TDMConfig())
  np.testing.assert_allclose(np.asarray(y), x0 + real - fake, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(dd), np.mean(np.abs(x0 - real), axis=(1, 2)), rtol=1e-6)
  _, dd0 = tdm.generator_target(x0, x0, fake, tdm.TDMConfig(normalizer_floor=1e-3))
  np.testing.assert_allclose(np.asarray(dd0), 1e-3)


def test_config_validation():
  with pytest.raises(ValueError, match="loss_type"):
    tdm.TDMConfig(loss_type="l1")
  with pytest.raises(ValueError, match="interval_mode"):
    tdm.TDMConfig(interval_mode="both")
  with pytest.raises(ValueError, match=r"total_steps=100.*raise total_steps"):
    tdm.TDMConfig(total_steps=100)  # intervals of 25: t ~ U[20, 14) is empty
  with pytest.raises(ValueError, match="total_steps=200 with 8 student steps"):
    tdm.TDMConfig(total_steps=200, step_choices=(1, 2, 8))
  tdm.TDMConfig(total_steps=200, step_choices=(1, 2, 4))  # intervals of 50: fine
  tdm.TDMConfig(total_steps=128)  # intervals of 32: U[20, 21) is the narrowest non-empty draw
  with pytest.raises(ValueError, match="total_steps"):
    tdm.TDMConfig(total_steps=124)  # intervals of 31: U[20, 20) is empty
  cfg = tdm.TDMConfig.from_config({"loss_type": "l2", "step_choices": [1, 2]})
  assert cfg.step_choices == (1, 2) and cfg.loss_type == "l2"
  for weights in ((1.0, 2.0), (1.0, 0.0, 1.0)):
    with pytest.raises(ValueError, match="one positive weight per entry"):
      tdm.TDMConfig(step_choices=(1, 2, 4), step_weights=weights)


def test_step_counts_are_drawn_with_their_weights():
  keys = jax.vmap(lambda i: rng.iteration_key(0, i))(jnp.arange(4000))
  for weights, want in (((), (1 / 3, 1 / 3, 1 / 3)), ((2, 1, 1), (0.5, 0.25, 0.25))):
    cfg = tdm.TDMConfig.from_config({"step_choices": (1, 2, 4), "step_weights": weights})
    drawn = np.asarray(jax.vmap(lambda k, cfg=cfg: tdm.draw_step_count(cfg, k))(keys))
    assert set(np.unique(drawn)) == {1, 2, 4}
    np.testing.assert_allclose([np.mean(drawn == k) for k in (1, 2, 4)], want, atol=0.03)


# ----------------------------------------------------------------------------- 5. guided_predict

@pytest.mark.parametrize("prediction_type,sample_shape", [("epsilon", (3,)), ("v_prediction", (2, 4, 4))])
def test_guided_predict(prediction_type, sample_shape):
  sched = make_schedule(prediction_type=prediction_type)
  b = 6
  params = init_params(90, sample_shape)
  cond, uncond = make_cond(91, b)
  x_t = normal(92, (b,) + sample_shape)
  t = jnp.asarray([999, 800, 500, 200, 20, 0], jnp.int32)
  steps = jnp.full((b,), 2, jnp.int32)

  def all_predictions(params, x_t, t, cond, uncond, steps):
    c = tdm.predict(apply, params, sched, x_t, t, cond, num_steps=steps)
    u = tdm.predict(apply, params, sched, x_t, t, uncond, num_steps=steps)
    guided = {w: tdm.guided_predict(apply, params, sched, x_t, t, cond, uncond, w, num_steps=steps)
              for w in (1.0, 0.0, 3.5)}
    c0 = tdm.predict(apply, params, sched, x_t, t, cond)[0]
    u0 = tdm.predict(apply, params, sched, x_t, t, uncond)[0]
    return c, u, guided, (c0, u0, tdm.guided_x0(apply, params, sched, x_t, t, cond, uncond, 2.0))

  (c_x0, c_eps), (u_x0, u_eps), guided, (c0, u0, g2) = jit(all_predictions)(params, x_t, t, cond, uncond, steps)
  assert float(jnp.max(jnp.abs(c_x0 - u_x0))) > 1e-2  # the condition matters
  g_x0, g_eps = guided[1.0]
  np.testing.assert_allclose(np.asarray(g_x0), np.asarray(c_x0), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(g_eps), np.asarray(c_eps), rtol=1e-6, atol=1e-6)
  for w in (0.0, 3.5):
    g_x0, g_eps = guided[w]
    np.testing.assert_allclose(np.asarray(g_x0), np.asarray(u_x0 + w * (c_x0 - u_x0)), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(g_eps), np.asarray(u_eps + w * (c_eps - u_eps)), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(g2), np.asarray(u0 + 2.0 * (c0 - u0)), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- 6. jit, variants

@pytest.mark.parametrize("k", [1, 2, 4])
def test_a_traced_step_count_computes_what_the_fixed_one_does(sched, k):
  """Unified TDM runs K as a traced value (one program for every K); at each K it must be the
  fixed-K iteration: same rollout, same segments, same updates."""
  cfg = tdm.TDMConfig(step_choices=(1, 2, 4))
  s = strict_apply(need_steps=True)
  nets = tdm.Networks(apply, student=s, fake=s)
  b, shape = 8, (3,)
  teacher = init_params(70, shape)
  cond, uncond = make_cond(71, b)
  student_tx, fake_tx = optax.adam(1e-3, b1=0.0, b2=0.95), optax.adam(1e-2, b1=0.0, b2=0.95)
  state = tdm.init_state(perturb(teacher, 72, 0.02), teacher, student_tx, fake_tx)
  body = functools.partial(tdm._iteration_for_k, nets=nets, schedule=sched, cfg=cfg, student_tx=student_tx,
                           fake_tx=fake_tx, sample_shape=shape, ema_decay=0.0)  # pylint: disable=protected-access
  key = rng.iteration_key(0, 3)
  fixed = jit(lambda st: body(k, st, teacher, cond, uncond, key))(state)
  traced = jit(lambda kk, st: body(kk, st, teacher, cond, uncond, key))(jnp.int32(k), state)
  for a, b_ in zip(jax.tree.leaves(fixed), jax.tree.leaves(traced)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b_), rtol=1e-5, atol=1e-6)
  taus, nxt, lows = tdm.step_grid(800, jnp.int32(k), 4)
  np.testing.assert_array_equal(np.asarray(taus)[:k], tdm.student_timesteps(800, k))
  np.testing.assert_array_equal(np.asarray(lows)[:k], tdm.interval_lower_ends(800, k))
  assert int(nxt[k - 1]) == -1


def test_a_traced_step_count_rollout_with_a_bf16_network(sched):
  """Networks that compute in bf16 (SDXL's config) through the traced-K rollout: the slots it runs are the
  fixed-K rollout's, in the same (the noise's) dtypes, and the skipped ones zeros."""
  bf16 = lambda *a, **kw: apply(*a, **kw).astype(jnp.bfloat16)
  params = init_params(80, (3,))
  cond, _ = make_cond(81, 4)
  z = normal(82, (4, 3))
  traced = jit(lambda k: tdm.rollout_first(bf16, params, sched, z, cond, k, 4, 800))(jnp.int32(2))
  fixed = tdm.rollout(bf16, params, sched, z, cond, tdm.student_timesteps(800, 2))
  assert traced.eps.dtype == fixed.eps.dtype == z.dtype and traced.x0.dtype == fixed.x0.dtype == z.dtype
  for a, b in zip((traced.x, traced.x0, traced.eps), (fixed.x, fixed.x0, fixed.eps)):
    np.testing.assert_allclose(np.asarray(a[:2], np.float32), np.asarray(b, np.float32), rtol=1e-2, atol=1e-2)
    assert not np.any(np.asarray(a[2:], np.float32))


@pytest.mark.parametrize("variant,sample_shape", [("step_choices", (3,)), ("shared_segment", (2, 4, 4))])
def test_tdm_iteration_jits(sched, variant, sample_shape):
  """The default config under jit is exercised for (3,) and (2, 4, 4) by the tests above."""
  if variant == "step_choices":
    cfg = tdm.TDMConfig(step_choices=(1, 2, 4))
    s = strict_apply(need_steps=True)
    nets = tdm.Networks(apply, student=s, fake=s)
  else:
    cfg = tdm.TDMConfig(interval_mode="shared", condition_fake_on_segment=True)
    nets = tdm.Networks(apply, fake=strict_apply(need_segment=True))
  b = 8
  teacher = init_params(60, sample_shape)
  cond, uncond = make_cond(61, b)
  student_tx = optax.adam(1e-3, b1=0.0, b2=0.95)  # no weight decay: rows without gradient stay put
  fake_tx = optax.adam(1e-2, b1=0.0, b2=0.95)
  state = tdm.init_state(perturb(teacher, 62, 0.02), teacher, student_tx, fake_tx)
  step = jit(functools.partial(tdm.tdm_iteration, nets=nets, schedule=sched, cfg=cfg, student_tx=student_tx,
                               fake_tx=fake_tx, sample_shape=sample_shape))
  ks = []
  for i in range(8 if variant == "step_choices" else 2):
    new_state, metrics = step(state, teacher, cond, uncond, rng.iteration_key(0, i))
    assert int(new_state.step) == 1
    for name, v in metrics.items():
      assert np.all(np.isfinite(np.asarray(v))), name
    assert float(metrics["generator_loss"]) > 0 and float(metrics["fake_loss"]) > 0
    ks.append(int(metrics["num_steps"]))
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    for a, b_ in zip(jax.tree.leaves(new_state), jax.tree.leaves(state)):
      assert a.shape == b_.shape and a.dtype == b_.dtype
    assert not np.array_equal(np.asarray(new_state.student_params["w"]), np.asarray(state.student_params["w"]))
  if variant == "step_choices":
    assert set(ks) <= {1, 2, 4} and len(set(ks)) >= 2
    # The step-count embedding of the drawn K is trained, the others are not.
    for new, old in ((new_state.student_params, state.student_params), (new_state.fake_params, state.fake_params)):
      moved = np.abs(np.asarray(new["steps"] - old["steps"])).sum(-1) > 0
      assert moved.tolist() == [i == ks[-1] for i in range(9)]
  else:
    assert set(ks) == {4}
    moved = np.abs(np.asarray(new_state.fake_params["segment"] - state.fake_params["segment"])).sum(-1) > 0
    assert moved.any() and not moved[0] and not moved[5:].any()  # only segments k in 1..4
    assert not np.any(new_state.student_params["segment"] != state.student_params["segment"])
  s2, _ = step(new_state, teacher, cond, uncond, rng.iteration_key(0, 1))
  assert int(s2.step) == 2


# ----------------------------------------------------------------------------- 7. rollout

@pytest.mark.parametrize("sample_shape", SHAPES)
def test_rollout(sched, sample_shape):
  b, k, s = 5, 4, 800
  params = init_params(100, sample_shape)
  cond, _ = make_cond(101, b)
  z = normal(102, (b,) + sample_shape)
  taus = tdm.student_timesteps(s, k)

  def manual(params, z, cond):
    """A hand-written DDIM loop over the student timesteps."""
    x, xs, x0s = z, [], []
    for j, tau in enumerate(taus):
      x0, eps = tdm.predict(apply, params, sched, x, jnp.full((b,), tau), cond)
      xs.append(x)
      x0s.append(x0)
      t_next = taus[j + 1] if j + 1 < k else -1
      x = sched.a(t_next) * x0 + sched.s(t_next) * eps
    return jnp.stack(xs), jnp.stack(x0s), x

  roll = lambda p, z, c: tdm.rollout(apply, p, sched, z, c, taus)
  no_grad = jax.grad(lambda p, z, c: jnp.sum(roll(p, z, c).sample ** 2))
  traj, (xs, x0s, final), g = jit(lambda p, z, c: (roll(p, z, c), manual(p, z, c), no_grad(p, z, c)))(
      params, z, cond)

  assert traj.x.shape == traj.x0.shape == traj.eps.shape == (k, b) + sample_shape
  np.testing.assert_array_equal(np.asarray(traj.timesteps), taus)
  np.testing.assert_array_equal(np.asarray(traj.x[0]), np.asarray(z))
  np.testing.assert_allclose(np.asarray(traj.x), np.asarray(xs), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(traj.x0), np.asarray(x0s), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(traj.sample), np.asarray(final), rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(np.asarray(traj.sample), np.asarray(traj.x0[-1]))
  assert float(jnp.max(jnp.abs(traj.sample - traj.x[-1]))) > 1e-2  # the last step does move x
  assert max_abs(g) == 0.0  # the rollout runs without gradients

  # gather_points picks point j[b] for sample b.
  j = jnp.array([0, 3, 1, 2, 3])
  got = tdm.gather_points(traj.x, j)
  for i in range(b):
    np.testing.assert_array_equal(np.asarray(got[i]), np.asarray(traj.x[int(j[i]), i]))
