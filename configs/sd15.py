"""Stable Diffusion 1.5 distilled with TDM at 512 px (LoRA student over the frozen teacher).

  python -m tdm_jax.main --config=configs/sd15.py --workdir=DIR \
      --config.teacher.pipeline=/path/to/stable-diffusion-v1-5 --config.data.prompt_source=prompts.txt

The paper publishes no SD 1.5 settings; these are SDXL's (lrs 1e-6 / 5e-6, batch 64, 1k
iterations) with SD 1.5's usual guidance 7.5, in one stage at its native 512 px.
"""

import ml_collections

from tdm_jax import default_config


def get_config() -> ml_collections.ConfigDict:
  config = default_config.diffusers_config(reference="configs/diffusers/sd-1.5", resolution=512,
                                           lora_rank=64, lora_alpha=64.0)
  config.tdm.guidance_scale = 7.5
  # One student for 1, 2 and 4 steps (unified TDM): K drawn per iteration, its table trained in full
  # beside the adapters; exported as pipeline_{K}step/ and lora/ + lora_{K}step/ (README).
  config.tdm.step_choices = (1, 2, 4)
  config.optim.student_lr = 1e-6
  config.optim.fake_lr = 5e-6
  config.optim.lr_scales = (("^class_embedding/", 100.0),)  # the K table's rate, as configs/sdxl.py
  config.train.batch_size = 64
  config.train.num_iterations = 1000
  config.train.checkpoint_every = 100
  config.mesh.shape = (1, -1, 1)
  config.eval.num_samples = 8
  config.eval.teacher_steps = (25,)
  config.eval.student_steps = (1, 2, 4)
  return config
