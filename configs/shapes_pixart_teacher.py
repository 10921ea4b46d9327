"""Remakes the shipped PixArt-style shapes teacher (tdm_jax/assets/shapes_pixart/) from nothing, on CPU.

  python -m tdm_jax.main --config=configs/shapes_pixart_teacher.py --workdir=DIR --mode=pretrain

Stages (T5 tokenizer, transformer + T5 encoder, Diffusers folder) resume from DIR; see
tdm_jax/tasks/shapes/pixart_teacher.py. The VAE is the shipped SDXL-style teacher's, the evaluator and
prompt files too. DIR/pipeline is then what tdm_jax/assets/shapes_pixart/pipeline holds.
"""

import ml_collections

from tdm_jax import default_config
from tdm_jax.tasks.shapes import teacher as shapes_teacher


def get_config() -> ml_collections.ConfigDict:
  config = default_config.get_config()
  config.task = "shapes_pixart_teacher"
  # PixArt's own noise schedule (its scheduler_config.json): linear betas 1e-4..0.02, epsilon.
  config.schedule.beta_schedule = "linear"
  config.schedule.beta_start = 1e-4
  config.schedule.beta_end = 0.02
  with config.unlocked():
    config.shapes = ml_collections.ConfigDict(dict(image_size=32))
    config.vae_from = shapes_teacher.SHIPPED_PIPELINE  # a pipeline folder whose vae/ this teacher uses
    # The transformer: 4x4 patch tokens of the 8x8 latents (patch 2, as PixArt's), width 192; 0.45 s per
    # iteration at batch 64 on 2 cores, half the cost of patch 1 at width 128.
    # min_snr_gamma: the epsilon error weighted as Min-SNR-gamma (Hang et al. 2023) does, min(SNR, 5) / SNR;
    # 0 trains on the plain epsilon error (50-step CFG FD 49.1 against 32.3 with 5, 8,000 iterations each;
    # 12,000 with 5: 24.6).
    # A T5 v1.1 encoder (gated-GELU, relative position buckets) trained with the transformer; its
    # sentencepiece tokenizer is trained on `tokenizer_captions` captions; training pads captions to
    # `train_length` tokens (the pipeline pads to 120: the same function, padding is masked).
    config.text = ml_collections.ConfigDict(dict(
        vocab_size=150, tokenizer_captions=5000, train_length=32, d_model=64, d_kv=16, d_ff=256, num_layers=2, num_heads=4,
        relative_attention_num_buckets=32, relative_attention_max_distance=128))
    config.transformer = ml_collections.ConfigDict(dict(
        num_attention_heads=6, attention_head_dim=32, num_layers=6, patch_size=2,
        num_iterations=12000, batch_size=64, learning_rate=5e-4, warmup_steps=200, cond_dropout=0.1,
        ema_decay=0.999, min_snr_gamma=5.0))
  config.train.checkpoint_every = 500
  config.lock()
  return config
