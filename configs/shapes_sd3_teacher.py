"""Remakes the shipped SD3-style shapes teacher (tdm_jax/assets/shapes_sd3/) from the other two, on CPU.

  python -m tdm_jax.main --config=configs/shapes_sd3_teacher.py --workdir=DIR --mode=pretrain

Stages (the frozen components, the transformer, the Diffusers folder) resume from DIR; see
tdm_jax/tasks/shapes/sd3_teacher.py. The text encoders and tokenizers are the shipped teachers'
(CLIP pair: the SDXL-style one's; T5: the PixArt-style one's), frozen; the VAE is the SDXL-style
teacher's. Only the MMDiT is trained, with the rectified-flow objective. DIR/pipeline is then what
tdm_jax/assets/shapes_sd3/pipeline holds.
"""

import ml_collections

from tdm_jax import default_config
from tdm_jax.tasks.shapes import pixart_teacher
from tdm_jax.tasks.shapes import teacher as shapes_teacher


def get_config() -> ml_collections.ConfigDict:
  config = default_config.get_config()
  config.task = "shapes_sd3_teacher"
  with config.unlocked():
    # SD3's FlowMatchEulerDiscreteScheduler: sigma grids warped by shift 3, the velocity predicted.
    config.schedule = ml_collections.ConfigDict(dict(shift=3.0))
    config.shapes = ml_collections.ConfigDict(dict(image_size=32))
    config.clip_from = shapes_teacher.SHIPPED_PIPELINE  # its CLIP pair, tokenizers and VAE
    config.t5_from = pixart_teacher.SHIPPED_PIPELINE  # its T5 encoder and sentencepiece tokenizer
    # T5 tokens per prompt (SD3's pipelines default to 256; captions need under 32, and SD3 does not
    # mask T5's padding, so every call of this teacher passes max_sequence_length=32).
    config.text = ml_collections.ConfigDict(dict(max_sequence_length=32))
    # The MMDiT: 4x4 patch tokens of the 8x8 latents (patch 2), width 128 (4 heads of 32), SD3.5's RMS
    # QK-norm; the joint sequence is 16 image + 32 CLIP + 32 T5 tokens. min_snr_gamma 0: the plain
    # velocity error at logit-normal sigma, as SD3 was trained. The shipped weights: this config, except
    # that iterations 0-1,500 ran under an 8,000-iteration cosine horizon (the run was shortened at 1,500).
    config.transformer = ml_collections.ConfigDict(dict(
        num_attention_heads=4, attention_head_dim=32, num_layers=6, patch_size=2, pos_embed_max_size=8,
        dual_attention_layers=(), qk_norm="rms_norm",
        num_iterations=5000, batch_size=64, learning_rate=5e-4, warmup_steps=200, cond_dropout=0.1,
        ema_decay=0.999, min_snr_gamma=0.0))
  config.train.checkpoint_every = 500
  config.lock()
  return config
