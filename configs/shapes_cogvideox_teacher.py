"""Makes the embedded CogVideoX-style video teacher on the moving-shapes clips, on CPU.

  python -m tdm_jax.main --config=configs/shapes_cogvideox_teacher.py --workdir=DIR --mode=pretrain

Stages (the frozen components and configs, the VAE, the transformer, the Diffusers folder) resume from
DIR; see tdm_jax/tasks/shapes/cogvideox_teacher.py. The T5 text encoder and its sentencepiece tokenizer
are the PixArt-style shipped teacher's, frozen; the AutoencoderKLCogVideoX and the 2B-style
CogVideoXTransformer3DModel are trained here. DIR/pipeline is then a CogVideoXPipeline folder for
9-frame 32 x 32 clips (`num_frames=9, height=32, width=32, max_sequence_length=64` in stock calls).

Cost on the 2 CPU cores: VAE 1.2-1.7 s per iteration of 8 clips alone, 2-4 s beside other jobs (the 3-D
convolutions run as 2-D ones, models/layers.py); then the latent pool and the transformer.
"""

import ml_collections

from tdm_jax import default_config
from tdm_jax.tasks.shapes import pixart_teacher


def get_config() -> ml_collections.ConfigDict:
  config = default_config.get_config()
  config.task = "shapes_cogvideox_teacher"
  with config.unlocked():
    # CogVideoX-2B's CogVideoXDDIMScheduler (scaled_linear 0.00085..0.012, v_prediction, zero terminal SNR,
    # trailing spacing, set_alpha_to_one) with snr_shift_scale 1 (5B's) rather than 2B's 3: the shift
    # divides the SNR at every timestep to make large, redundant latents (2B's 13 x 16 x 60 x 90) noisier;
    # these latents are 5 x 16 x 8 x 8 (219 times fewer values). Unshifted, the SNR is already 0.32 at
    # t=500 and 0.03 at t=750; shift 3 makes those 0.1 and 0.01, spending the upper half of training and of
    # the trailing DDIM steps on near-pure noise that a 5,120-value latent does not need.
    config.schedule = ml_collections.ConfigDict(dict(snr_shift_scale=1.0))
    # video_data's clips: 9 frames (1 + 2k, for the VAE's 2x temporal compression) of 32 x 32.
    config.shapes = ml_collections.ConfigDict(dict(image_size=32, frames=9))
    config.t5_from = pixart_teacher.SHIPPED_PIPELINE  # its T5 encoder and sentencepiece tokenizer
    # T5 tokens per prompt, CogVideoX-style: padded to this many, no mask. The video captions take up to
    # 54 tokens (20,000 drawn: median 32; the motion words are spelt in pieces of the image vocabulary);
    # a 2B-style transformer takes exactly max_text_seq_length = this many, so every call passes it.
    config.text = ml_collections.ConfigDict(dict(max_sequence_length=64))
    # The VAE: 3 blocks, space 4x (32 -> 8) and time 2x (block 0: 9 frames -> 5 latent frames), 16 latent
    # channels (CogVideoX's); L1 with object pixels weighted 20x (objects cover a few percent of a
    # frame) and a light KL, as the image teacher's VAE. The scaling factor is 1 / std of `scaling_clips`
    # clips' posterior-mean latents. With 4 latent channels and 600 iterations, the shipped video classifier
    # read 128 held-out clips' reconstructions with adherence 0.26 (shape right in 0.33 of them: blurred),
    # temporal consistency 0.39: a ceiling no transformer on those latents could pass; 16 channels and 1,500
    # iterations at batch 8 (12,000 clips) read 0.52 and 0.37: small shapes moving 4 frames inside one
    # latent frame came out as blobs smeared along their path. CogVideoX's 4x time compression suits 49
    # frames of 480 x 720 whose objects span many pixels; these objects span 3-8 pixels and move ~1 pixel a
    # frame, so this VAE halves time once (5 latent frames: every latent value covers 2 frames).
    # benchmarks/video_vae_ceiling.py measures the ceiling.
    config.vae = ml_collections.ConfigDict(dict(
        block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=16, norm_num_groups=8,
        temporal_compression_ratio=2, num_iterations=1500, batch_size=8, learning_rate=2e-3, warmup_steps=100,
        kl_weight=1e-4, object_weight=20.0, scaling_clips=256))
    # The transformer: 2B-style (3-D sin-cos positions added to the video tokens, no rotary), width 128
    # (4 heads of 32), 6 blocks, patch 2: 5 x 4 x 4 = 80 video tokens after 64 text tokens in one joint
    # attention. spatial_interpolation_scale 1 (2B: 1.875, for its 30 x 45 patch grid): positions one
    # apart on a 4 x 4 grid. v objective (CogVideoX's) at uniform timesteps, min_snr_gamma 0 (plain).
    # latent_pool: clips encoded once by the trained VAE and revisited (8,000 x 32 draws: ~8 epochs), each
    # visit a fresh posterior sample; encoding in the step would cost 2.4 s of a 3.1 s iteration.
    config.transformer = ml_collections.ConfigDict(dict(
        num_attention_heads=4, attention_head_dim=32, num_layers=6, patch_size=2, time_embed_dim=64,
        spatial_interpolation_scale=1.0, latent_pool=4096,
        num_iterations=2000, batch_size=32, learning_rate=5e-4, warmup_steps=200, cond_dropout=0.1,
        ema_decay=0.999, min_snr_gamma=0.0))
    # The main command's captions (configs/shapes_cogvideox.py): train-split ones to distil on, held-out ones
    # (x 4 noises) to evaluate with.
    config.prompts = ml_collections.ConfigDict(dict(num_train=5000, num_eval=64))
  config.train.checkpoint_every = 250  # 5-15 minutes of either stage
  config.lock()
  return config
