"""The variance-preserving path, pinned: the TDM iteration, its draws and the samplers on a discrete
schedule give what they gave before schedules became (a(t), s(t)) pairs with rectified flow beside
them (tests/data/pinned_vp.npz: `vp_outputs` run on the code of commit 4d49c6f, with the jax version and
CPU it ran on; `python tests/test_vp_pinned.py` writes a pin from the code checked out).

Bitwise on the jax version and CPU that wrote the pin (the integer timesteps, every draw, every weight
after an iteration, every sample). XLA:CPU compiles for the host's vector units, so another CPU or jax
version may round a few floats differently (one float32 ulp in a few weights and samples, measured between
two hosts of this project): there the floats are held to 1e-6 relative and the integer timesteps stay exact.
"""

import functools
import hashlib
import os
import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tdm_jax.core import rng, sample, tdm
from tdm_jax.core.schedules import make_schedule

sys.path.insert(0, os.path.dirname(__file__))
from test_tdm import apply, init_params, jit, make_cond, perturb, strict_apply  # pylint: disable=wrong-import-position

PIN = os.path.join(os.path.dirname(__file__), "data", "pinned_vp.npz")
SHAPE, BATCH = (2, 4, 4), 8


def host_cpu() -> str:
  """The CPU model and a digest of its feature flags (XLA:CPU's code, so its rounding, follows them)."""
  try:
    with open("/proc/cpuinfo") as f:
      pairs = (line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line)
      fields = {key.strip(): value.strip() for key, value in pairs}
  except OSError:
    return platform.machine()
  flags = " ".join(sorted(fields.get("flags", "").split()))
  return f"{fields.get('model name', platform.machine())} [{hashlib.sha1(flags.encode()).hexdigest()[:12]}]"


def vp_outputs() -> dict:
  """Named arrays of one fixed-K and one unified (traced-K) iteration, their draws, and the samplers."""
  out = {}
  teacher = init_params(70, SHAPE)
  cond, uncond = make_cond(71, BATCH)
  student_tx = optax.adamw(1e-3, b1=0.0, b2=0.95, weight_decay=1e-2)
  fake_tx = optax.adamw(1e-2, b1=0.0, b2=0.95, weight_decay=1e-2)
  for name, prediction, cfg, nets in (
      ("fixed", "epsilon", tdm.TDMConfig(guidance_scale=3.0, random_mid=True), tdm.Networks(apply)),
      ("unified", "v_prediction", tdm.TDMConfig(step_choices=(1, 2, 4), total_steps=1000, interval_mode="shared"),
       tdm.Networks(apply, student=strict_apply(need_steps=True), fake=strict_apply(need_steps=True)))):
    sched = make_schedule(prediction_type=prediction)
    state = tdm.init_state(perturb(teacher, 72, 0.02), teacher, student_tx, fake_tx)
    step = jit(functools.partial(tdm.tdm_iteration, nets=nets, schedule=sched, cfg=cfg, student_tx=student_tx,
                                 fake_tx=fake_tx, sample_shape=SHAPE))
    for i in range(2):
      state, metrics = step(state, teacher, cond, uncond, rng.iteration_key(5, i))
      for key, value in metrics.items():
        out[f"{name}_{i}_metric_{key}"] = np.asarray(value)
    for j, leaf in enumerate(jax.tree.leaves((state.student_params, state.fake_params))):
      out[f"{name}_param_{j}"] = np.asarray(leaf)
    draws = jit(lambda k: tdm.iteration_draws(cfg, k, BATCH, SHAPE, 2 if name == "unified" else None))(
        rng.iteration_key(5, 7))
    for j, leaf in enumerate(jax.tree.leaves(draws)):
      out[f"{name}_draw_{j}"] = np.asarray(leaf)
    z = jnp.asarray(np.random.default_rng(73).standard_normal((BATCH,) + SHAPE), jnp.float32)
    for solver in ("ddim", "dpm_solver_2m"):
      out[f"{name}_student_{solver}"] = np.asarray(jit(functools.partial(
          sample.student_sample, apply, solver=solver, num_steps=4, total_steps=cfg.total_steps))(
              state.student_params, sched, z, cond))
      out[f"{name}_teacher_{solver}"] = np.asarray(jit(functools.partial(
          sample.teacher_sample, apply, num_steps=6, guidance_scale=2.5, solver=solver, spacing="trailing"))(
              teacher, sched, z, cond, uncond))
  return out


def test_vp_path_is_what_it_was():
  pinned = np.load(PIN)
  got = vp_outputs()
  assert sorted(got) == sorted(k for k in pinned.files if k not in ("jax_version", "cpu"))
  exact = str(pinned["jax_version"]) == jax.__version__ and str(pinned["cpu"]) == host_cpu()
  for key, value in got.items():
    want = pinned[key]
    assert value.dtype == want.dtype and value.shape == want.shape, key
    if exact or not np.issubdtype(value.dtype, np.floating):
      np.testing.assert_array_equal(value, want, err_msg=key)
    else:
      np.testing.assert_allclose(value, want, rtol=1e-6, atol=1e-7, err_msg=key)


if __name__ == "__main__":
  np.savez_compressed(PIN, jax_version=np.asarray(jax.__version__), cpu=np.asarray(host_cpu()), **vp_outputs())
  print("wrote", PIN)
