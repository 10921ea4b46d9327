"""Remakes the shipped shapes teacher (tdm_jax/assets/shapes/) from nothing, on CPU.

  python -m tdm_jax.main --config=configs/shapes_teacher.py --workdir=DIR --mode=pretrain

Stages (VAE, UNet + text encoders, Diffusers folder, evaluator) resume from DIR; see
tdm_jax/tasks/shapes/teacher.py. DIR/pipeline is then what tdm_jax/assets/shapes/pipeline holds.
"""

import ml_collections

from tdm_jax import default_config


def get_config() -> ml_collections.ConfigDict:
  config = default_config.get_config()
  config.task = "shapes_teacher"
  with config.unlocked():
    config.shapes = ml_collections.ConfigDict(dict(image_size=32))
    # Both CLIP text encoders (the second with SDXL's pooled projection); one token per caption word.
    config.text = ml_collections.ConfigDict(dict(
        max_length=32, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        projection_dim=64))
    config.vae = ml_collections.ConfigDict(dict(
        block_out_channels=(16, 32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=8,
        num_iterations=1800, batch_size=32, learning_rate=2e-3, warmup_steps=100, kl_weight=1e-4,
        object_weight=20.0))
    config.unet = ml_collections.ConfigDict(dict(
        block_out_channels=(32, 64, 64), layers_per_block=2, attention_heads=(1, 2, 2),
        transformer_layers_per_block=(1, 1, 1), norm_num_groups=8, addition_time_embed_dim=32,
        num_iterations=5000, batch_size=64, learning_rate=5e-4, warmup_steps=200, cond_dropout=0.1,
        ema_decay=0.999))
    config.evaluator = ml_collections.ConfigDict(dict(num_iterations=1500, batch_size=128, held_out=1000))
    config.prompts = ml_collections.ConfigDict(dict(num_train=5000, num_eval=128))
  config.train.checkpoint_every = 500
  config.lock()
  return config
