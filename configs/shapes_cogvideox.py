"""The fourth main command: TDM on the shipped CogVideoX-style moving-shapes pipeline (text to video), on CPU.

  python -m tdm_jax.main --config=configs/shapes_cogvideox.py --workdir=/tmp/tdm_shapes_cogvideox

converts the small CogVideoXPipeline folder in tdm_jax/assets/shapes_cogvideox/pipeline (a 2B-style
CogVideoXTransformer3DModel, the causal 3-D AutoencoderKLCogVideoX, T5 with no attention mask, CogVideoX's
DDIM schedule with v-prediction and zero terminal SNR: the path configs/cogvideox_2b.py takes), distils ONE
student for 1, 2 and 4 steps with unified TDM on the trailing grid (999 / 749 / 499 / 249 for K = 4;
full-copy student and fake score), exports it as WORKDIR/export/pipeline_{K}step (a stock
`CogVideoXPipeline` call with guidance_scale=1, num_inference_steps=K, num_frames=9, height=width=32 and
max_sequence_length=64 samples it) and writes the evaluation table, GIF and MP4 grids to WORKDIR/eval:
held-out captions x 4 noises scored by the shipped video classifier (FD on its features against the
captions' real clips, adherence with the motion, temporal consistency, diversity), the teacher at
CogVideoXPipeline's 50 steps and at the student's 4.
configs/shapes_cogvideox_teacher.py makes the teacher itself. Until its trained folder ships in
tdm_jax/assets/shapes_cogvideox/ (the training is under way: docs/cogvideox.md), point this command at a
teacher made by that config's --mode=pretrain in DIR:

  python -m tdm_jax.main --config=configs/shapes_cogvideox.py --workdir=/tmp/tdm_shapes_cogvideox \
      --config.teacher.pipeline=DIR/pipeline --config.data.prompt_source=DIR/prompts_train.txt \
      --config.eval.prompt_file=DIR/prompts_eval.txt

The rates and the 300 iterations are configs/shapes_sd3.py's, not yet tuned on this teacher.
"""

import ml_collections

from tdm_jax.tasks.shapes import cogvideox_teacher
from tdm_jax.tasks.shapes import teacher as shapes_teacher


def get_config() -> ml_collections.ConfigDict:
  config = shapes_teacher.distillation_config(cogvideox_teacher.SHIPPED_PIPELINE)
  config.data.prompt_source = cogvideox_teacher.SHIPPED_TRAIN_PROMPTS
  config.tdm.total_steps = 1000  # CogVideoX's trailing grid, as configs/cogvideox_2b.py
  config.optim.student_lr = 6e-5
  config.optim.fake_lr = 7e-5
  config.optim.lr_scales = (("^step_embedding/", 100.0),)  # the K table's rate, as configs/shapes.py's
  config.train.num_iterations = 300
  e = config.eval
  e.prompt_file = cogvideox_teacher.SHIPPED_EVAL_PROMPTS
  e.classifier = cogvideox_teacher.SHIPPED_EVALUATOR
  e.num_samples = 64  # the shipped held-out captions, x 4 noises
  e.teacher_steps = (50, 4)  # CogVideoXPipeline's default, and the student's budget
  return config
