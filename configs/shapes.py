"""The embedded default: TDM on the shipped shapes pipeline, on CPU, end to end.

  python -m tdm_jax.main --config=configs/shapes.py --workdir=/tmp/tdm_shapes

converts the small SDXL-style Diffusers folder in tdm_jax/assets/shapes/pipeline (the path SDXL
takes: configs/sdxl.py), distils ONE student for 1, 2 and 4 steps with unified TDM (K drawn per
iteration and given to student and fake score), exports it as WORKDIR/export/pipeline_{K}step
(stock Diffusers samples it with `pipe(prompts, num_inference_steps=K)`) and writes the evaluation
table and image grids to WORKDIR/eval.
configs/shapes_teacher.py remakes the teacher itself.
"""

import ml_collections

from tdm_jax.tasks.shapes import teacher as shapes_teacher


def get_config() -> ml_collections.ConfigDict:
  config = shapes_teacher.distillation_config(shapes_teacher.SHIPPED_PIPELINE)
  # Unified TDM, K in (1, 2, 4) (README: 2 steps FD 1.46x -> 1.10x the 50-step teacher's, 4 steps unchanged).
  config.optim.student_lr = 2e-5
  config.optim.fake_lr = 1e-4
  # The K table at 100x the student's rate: Adam moves each entry by ~lr per iteration, and at 2e-5 the
  # table barely leaves zero in 700 iterations (README: 1-step FD 154 -> 130, 2 and 4 steps no worse).
  config.optim.lr_scales = (("^class_embedding/", 100.0),)
  config.train.num_iterations = 700
  return config
