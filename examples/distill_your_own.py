"""Distill your own denoiser: any `apply(params, x_t, t, cond)` plus teacher parameters in, a
few-step student out. Runs as is: `python examples/distill_your_own.py [workdir] [--quick]`."""
import sys

import jax
import jax.numpy as jnp
import numpy as np

from tdm_jax import default_config
from tdm_jax.core import pretrain, sample, train
from tdm_jax.core.schedules import make_schedule
from tdm_jax.models.mlp import MLPDenoiser, init_params
from tdm_jax.tasks.toy import mixture as toy

workdir = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] != "--quick" else "/tmp/distill_your_own"
scale = 20 if "--quick" in sys.argv else 1  # --quick: 20x fewer iterations (a smoke test)

# 1. Your teacher: an apply function and its parameters. Here a class-conditional MLP on a 2-D
#    mixture of Gaussians, trained in seconds; label 4 is "no label" for classifier-free guidance.
mixture = toy.MixtureOfGaussians(dim=2, num_classes=4)
model = MLPDenoiser(dim=2, num_classes=4, width=128)
apply = lambda params, x_t, t, cond: model.apply({"params": params}, x_t, t, cond)
schedule = make_schedule("linear", 1e-4, 0.02, prediction_type="epsilon")


def data(key, n):
  labels = mixture.sample_labels(key, n)
  return mixture.sample(jax.random.fold_in(key, 1), labels), {"label": labels}, {"label": jnp.full((n,), 4)}


teacher = pretrain.pretrain(apply, init_params(model, jax.random.key(0)), schedule, data,
                            num_iterations=3000 // scale, batch_size=256, learning_rate=1e-3, cond_dropout=0.1,
                            seed=0, warmup_steps=100 // scale)


# 2. Distil it: a Task says what TDM needs; the config holds every TDM.md option.
def batch(step, n):  # the conditioning of iteration `step` (host arrays, a pure function of step)
  labels = np.random.default_rng(step).integers(0, 4, n).astype(np.int32)
  return {"label": labels}, {"label": np.full((n,), 4, np.int32)}


task = train.Task(apply=apply, teacher_params=teacher, schedule=schedule, sample_shape=(2,), batch=batch)
config = default_config.get_config()
config.tdm.guidance_scale = 1.0
config.optim.student_lr, config.optim.fake_lr = 5e-5, 5e-4
config.train.num_iterations, config.train.batch_size = 1000 // scale, 256
state = train.distill(task, config, workdir)  # checkpoints and metrics in workdir; resumes if re-run

# 3. Sample from the 4-step student (and from 1 or 2 steps with the same weights).
z = jax.random.normal(jax.random.key(1), (8, 2))
labels = {"label": jnp.arange(8) % 4}
x = sample.student_sample(apply, state.student_params, schedule, z, labels, num_steps=4,
                          total_steps=config.tdm.total_steps)
print("4-step student samples:\n", np.asarray(x))
print("fraction near a mode of their own class:", toy.mode_coverage(x, labels["label"], mixture))
