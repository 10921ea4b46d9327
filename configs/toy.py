"""The vector example: a class-conditional MLP teacher on a 2-D mixture, distilled to 4 steps.

`python -m tdm_jax.main --config=configs/toy.py --workdir=/tmp/toy` pretrains the teacher
(cached in the workdir), distils it with TDM and prints the evaluation table; a few minutes
on 2 CPU cores.
"""

import ml_collections

from tdm_jax import default_config


def get_config() -> ml_collections.ConfigDict:
  config = default_config.get_config()
  config.task = "toy"
  config.schedule.beta_schedule = "linear"  # the PixArt demo's schedule
  config.schedule.beta_start = 1e-4
  config.schedule.beta_end = 0.02
  with config.unlocked():
    config.model = ml_collections.ConfigDict(dict(
        dim=2, num_classes=4, modes_per_class=3, mode_std=0.08, data_seed=0, width=128, depth=4,
        time_embed_dim=64))
    config.teacher = ml_collections.ConfigDict(dict(
        num_iterations=3000, batch_size=256, learning_rate=1e-3, cond_dropout=0.1, warmup_steps=100))
  # At guidance 1 the student's target is the teacher's own conditional distribution. The demo's
  # guidance 2 also works (README: the student then beats the teacher's 4 steps by less).
  config.tdm.guidance_scale = 1.0
  config.optim.fake_lr = 5e-4
  config.optim.student_lr = 5e-5
  config.optim.student_warmup_steps = 20
  config.train.num_iterations = 1000
  config.train.batch_size = 256
  config.train.checkpoint_every = 100
  config.eval.num_samples = 2000
  config.lock()
  return config
