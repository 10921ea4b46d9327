"""SDXL base 1.0 distilled with TDM (the paper's SDXL settings at 512 px).

  python -m tdm_jax.main --config=configs/sdxl.py --workdir=DIR \
      --config.teacher.pipeline=/path/to/stable-diffusion-xl-base-1.0 --config.data.prompt_file=prompts.txt

The first run converts the Diffusers folder into DIR/converted (`--mode=convert` does only that).
The noise schedule is the pipeline's own (scheduler/scheduler_config.json); `config.schedule` is
not used here. Without weights, `model.reference` holds the published configs for shape-only work
(`jax.eval_shape`, parameter counts, memory planning).
"""

import ml_collections

from tdm_jax import default_config


def get_config() -> ml_collections.ConfigDict:
  # 512 px: the paper trains 1k iterations at 512 px, then 1k at 1024 px.
  config = default_config.diffusers_config(reference="configs/diffusers/sdxl-base-1.0", resolution=512)
  config.tdm.guidance_scale = 8.0
  config.optim.student_lr = 1e-6
  config.optim.fake_lr = 5e-6
  config.train.batch_size = 64
  config.train.num_iterations = 1000
  config.train.checkpoint_every = 100
  config.eval.num_samples = 8
  config.eval.teacher_steps = (25,)
  return config
