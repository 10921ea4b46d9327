"""The third main command: TDM in rectified-flow form on the shipped SD3-style shapes pipeline, on CPU.

  python -m tdm_jax.main --config=configs/shapes_sd3.py --workdir=/tmp/tdm_shapes_sd3

converts the small StableDiffusion3Pipeline folder in tdm_jax/assets/shapes_sd3/pipeline (an MMDiT with
the CLIP pair and T5: the path configs/sd35_medium.py takes), distils ONE student for 1, 2 and 4 steps
with unified TDM on the flow grid (sigma = shift((K - j) / K), shift 3: times 1000 / 900 / 750 / 500 for
K = 4; full-copy student and fake score), exports it as WORKDIR/export/pipeline_{K}step (a stock
`StableDiffusion3Pipeline` call with guidance_scale=1.0, the student's sigmas and max_sequence_length=32
samples it; README) and writes the evaluation table and grids to WORKDIR/eval, scored as
configs/shapes.py's are (the same evaluator and held-out captions), the teacher at SD3's 28 steps.
configs/shapes_sd3_teacher.py remakes the teacher itself.
"""

import ml_collections

from tdm_jax import default_config
from tdm_jax.tasks.shapes import sd3_teacher
from tdm_jax.tasks.shapes import teacher as shapes_teacher


def get_config() -> ml_collections.ConfigDict:
  config = default_config.diffusers_config(dtype="float32", teacher_dtype="float32", remat=False)
  config.teacher.pipeline = sd3_teacher.SHIPPED_PIPELINE
  config.data.prompt_source = shapes_teacher.SHIPPED_TRAIN_PROMPTS
  config.model.max_sequence_length = 32  # the T5 length the teacher was trained at (SD3 does not mask padding)
  config.tdm.guidance_scale = 4.0
  config.tdm.step_choices = (1, 2, 4)
  config.optim.student_lr = 6e-5
  config.optim.fake_lr = 7e-5
  config.optim.lr_scales = (("^step_embedding/", 100.0),)  # the K table's rate, as configs/shapes.py's
  config.train.batch_size = 32
  config.train.num_iterations = 500
  config.train.checkpoint_every = 100
  shapes_teacher.use_shapes_benchmark(config.eval)
  config.eval.teacher_steps = (28, 4)  # StableDiffusion3Pipeline's default, and the student's budget
  return config
