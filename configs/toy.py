"""The vector example: a class-conditional MLP teacher on a 2-D mixture, distilled to 4 steps.

`python -m tdm_jax.main --config=configs/toy.py --workdir=/tmp/toy` pretrains the teacher
(cached in the workdir), distils it with TDM and prints the evaluation table; about a minute
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
        dim=2, num_classes=4, modes_per_class=3, mode_std=0.08, data_seed=0, width=256, depth=4,
        time_embed_dim=64))
    config.teacher = ml_collections.ConfigDict(dict(
        num_iterations=4000, batch_size=512, learning_rate=1e-3, cond_dropout=0.1, warmup_steps=100))
  config.tdm.guidance_scale = 2.0
  config.optim.fake_lr = 1e-3
  config.optim.student_lr = 2e-4
  config.optim.student_warmup_steps = 20
  config.train.num_iterations = 400
  config.train.batch_size = 256
  config.train.checkpoint_every = 100
  config.eval.num_samples = 2000
  config.eval.batch_size = 2000
  config.lock()
  return config
