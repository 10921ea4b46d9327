"""CogVideoX-2B (text to video, 49 frames at 480 x 720) distilled with TDM into a 4-step LoRA student.

  python -m tdm_jax.main --config=configs/cogvideox_2b.py --workdir=DIR \
      --config.teacher.pipeline=/path/to/CogVideoX-2b --config.data.prompt_source=prompts.txt

The paper's video result: CogVideoX-2B distilled to 4 NFE beats its teacher on VBench (80.91 -> 81.65);
the authors released that student as a LoRA. Here: K = 4 on the "trailing" grid 999 / 749 / 499 / 249
(S = 1000), which a stock `CogVideoXPipeline` call reproduces (`scheduler.set_timesteps(4)` on the
exported CogVideoXDDIMScheduler); the authors sampled their LoRA on 999 / 856 / 665 / 399, which no stock
CogVideoX scheduler can be told: `--config.tdm.student_timesteps='(999,856,665,399)'` trains on that grid,
sampled by our sampler (the export then warns that stock calls cannot reproduce it). The teacher's CFG is 6, the pipeline's default. The adapters (rank 64,
alpha 64: ours, the paper gives no rank) sit on the attention projections to_q / to_k / to_v / to_out, as
Diffusers' CogVideoX LoRA training places them; `--config.model.lora_rank=0` trains full float32
copies instead. The learning rates (student 1e-5, fake score 5e-5: the paper's SDXL ratio), the batch
(8 clips) and the 500 iterations are ours: the paper publishes none for video.

Video tokens: 13 latent frames x 30 x 45 patches = 17,550 per clip, plus 226 text tokens. Attention
never holds the whole score matrix (70 GiB per device at batch 1 with the guided pass): "auto" is splash on
TPUs and the chunked kernel on CPUs and, at this length, on GPUs; a setting that would hold it ("xla") is
refused before anything compiles. The frozen transformer and T5-XXL are bf16, compute bf16, remat on, every device
on `fsdp`; prompts are encoded inside the step (T5, 226 tokens, no mask, as the pipeline encodes them).
Without `teacher.pipeline`, `model.reference` (the published configs) gives random weights: shape-only
runs for the memory benchmark (benchmarks/README.md).
"""

import ml_collections

from tdm_jax import default_config


def get_config(reference: str = "configs/diffusers/cogvideox-2b") -> ml_collections.ConfigDict:
  config = default_config.diffusers_config(reference=reference, lora_rank=64, lora_alpha=64.0)
  config.tdm.total_steps = 1000  # the student's grid is 999 / 749 / 499 / 249: Diffusers' "trailing"
  config.tdm.num_student_steps = 4
  config.tdm.guidance_scale = 6.0  # CogVideoXPipeline's default
  config.optim.student_lr = 1e-5
  config.optim.fake_lr = 5e-5
  # The unified option's K table learns from zero at 100x; unused while tdm.step_choices is empty.
  config.optim.lr_scales = (("^step_embedding/", 100.0),)
  config.train.batch_size = 8
  config.train.num_iterations = 500
  config.train.checkpoint_every = 50
  config.mesh.shape = (1, -1, 1)  # every device on fsdp: parameters, adapters and Adam split, batch too
  config.eval.num_samples = 4
  config.eval.teacher_steps = (50,)  # CogVideoXPipeline's default
  config.eval.student_steps = (1, 2, 4)
  config.sample.teacher_steps = 50
  return config
