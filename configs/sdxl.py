"""SDXL base 1.0 distilled with TDM: stage 1 of the paper's recipe (512 px, LoRA student).

  python -m tdm_jax.main --config=configs/sdxl.py --workdir=STAGE1 \
      --config.teacher.pipeline=/path/to/stable-diffusion-xl-base-1.0 --config.data.prompt_source=prompts.txt

then stage 2 at 1024 px from stage 1's student: configs/sdxl_1024.py with
`--config.train.init_from=STAGE1`. The first run converts the Diffusers folder into
WORKDIR/converted (`--mode=convert` does only that). The noise schedule is the pipeline's own
(scheduler/scheduler_config.json); `config.schedule` is not used here.

Student and fake score are rank-64 LoRA adapters over the one frozen bf16 teacher, sharded over
all devices on the `fsdp` axis, told the step count K (1, 2 or 4, drawn per iteration) by a table
trained in full beside the adapters: one student for 1, 2 and 4 steps. Without
`teacher.pipeline`, `model.reference` (the published configs) gives random weights on the mesh:
shape-only runs for benchmarks and dry runs.
"""

import ml_collections

from tdm_jax import default_config


def get_config() -> ml_collections.ConfigDict:
  # The paper: 1k iterations at 512 px, then 1k at 1024 px; batch 64, CFG 8, lrs 1e-6 / 5e-6.
  config = default_config.diffusers_config(reference="configs/diffusers/sdxl-base-1.0", resolution=512,
                                           lora_rank=64, lora_alpha=64.0)
  config.tdm.guidance_scale = 8.0
  # One student for 1, 2 and 4 steps (unified TDM): K drawn per iteration, its table trained in full
  # beside the adapters; exported as pipeline_{K}step/ and lora/ + lora_{K}step/ (README).
  config.tdm.step_choices = (1, 2, 4)
  config.optim.student_lr = 1e-6
  config.optim.fake_lr = 5e-6
  # Adam moves each entry of the zero-initialised K table by about the learning rate per iteration:
  # at 1e-6 it could not leave ~1e-3 in 1k iterations, so it gets 100x (README, unified TDM).
  config.optim.lr_scales = (("^class_embedding/", 100.0),)
  config.train.batch_size = 64
  config.train.num_iterations = 1000
  config.train.checkpoint_every = 100
  config.mesh.shape = (1, -1, 1)  # every device on fsdp: parameters, adapters and Adam split, batch too
  config.eval.num_samples = 8
  config.eval.teacher_steps = (25,)
  config.eval.student_steps = (1, 2, 4)
  return config
