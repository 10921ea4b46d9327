"""The ceiling a video VAE puts on its teacher: held-out moving-shapes clips encoded and decoded (posterior
mean), scored by the shipped video classifier beside the real clips.

  python benchmarks/video_vae_ceiling.py --vae=DIR/base/vae [--clips=128]

DIR is a configs/shapes_cogvideox_teacher.py --mode=pretrain workdir (its VAE stage done). Prints the
scorer's figures (FD, adherence, temporal consistency) for the reconstructions and for the real clips, the
mean absolute pixel error, the fraction of clips with each attribute right, and the fraction of frames whose
per-frame readings are right (temporal consistency asks all 9 of a clip's to agree). A teacher sampling
through this decoder cannot read better than its reconstructions do.
"""

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from tdm_jax.convert import folders  # pylint: disable=wrong-import-position
from tdm_jax.infra import video  # pylint: disable=wrong-import-position
from tdm_jax.models import vae_cogvideox  # pylint: disable=wrong-import-position
from tdm_jax.tasks.diffusers.vaes import AUTOENCODER_KL_COGVIDEOX  # pylint: disable=wrong-import-position
from tdm_jax.tasks.shapes import cogvideox_teacher, video_data, video_evaluator  # pylint: disable=wrong-import-position

_VAE = flags.DEFINE_string("vae", None, "An AutoencoderKLCogVideoX folder (config.json + safetensors).", required=True)
_CLIPS = flags.DEFINE_integer("clips", 128, "Held-out clips to score (a multiple of --batch_size).")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Clips per encode/decode call.")
_SEED = flags.DEFINE_integer("seed", 99, "The held-out stream's seed.")


def main(_):
  cfg = vae_cogvideox.CogVideoXVAEConfig.from_dict(folders.read_config(_VAE.value))
  params = AUTOENCODER_KL_COGVIDEOX.params_from_state_dict(folders.load_state_dict(_VAE.value), cfg)
  shapes = video_data.VideoShapesConfig(image_size=cfg.sample_height, frames=9)
  videos, captions, scenes = video_data.batch(_SEED.value, 0, _CLIPS.value, shapes, split="eval")
  x = video_data.videos_to_float(videos, shapes.frames)
  round_trip = jax.jit(lambda p, v: vae_cogvideox.decode(p, vae_cogvideox.encode(p, v, cfg)[0], cfg))
  recon = np.concatenate([np.asarray(round_trip(params, x[i:i + _BATCH.value]))
                          for i in range(0, len(x), _BATCH.value)])
  recon_u8 = video.to_uint8(recon.swapaxes(1, 2))  # (N, C, F, H, W) -> the denoiser layout it takes
  scorer = video_evaluator.VideoPromptScorer(cogvideox_teacher.SHIPPED_EVALUATOR, captions)
  for name, clips in (("reconstructions", recon_u8), ("real clips", videos)):
    predictions = video_evaluator.predict(scorer.params, clips, scorer.config)
    matches = video_evaluator.attribute_matches(predictions, scenes)
    print(name, {k: round(float(v), 4) for k, v in scorer(clips).items()},
          "attributes right:", {k: round(float(np.mean(v)), 4) for k, v in matches.items()},
          "per frame:", {k: round(v, 4) for k, v in video_evaluator.frame_accuracy(predictions, scenes).items()})
  print(f"mean absolute error {np.abs(recon - x).mean():.4f} (pixels in [-1, 1])")


if __name__ == "__main__":
  app.run(main)
