"""PixArt-Sigma XL-2 1024-MS distilled with TDM: configs/pixart_alpha.py's recipe on Sigma.

  python -m tdm_jax.main --config=configs/pixart_sigma.py --workdir=DIR \
      --config.teacher.pipeline=/path/to/PixArt-Sigma-XL-2-1024-MS --config.data.prompt_source=prompts.txt

Sigma encodes 300 T5 tokens per prompt (PixArtSigmaPipeline's default), reads no resolution condition
and ships the SDXL VAE (same shapes); its published pipeline keeps PixArt's linear betas.
"""

import importlib.util
import os

import ml_collections

# The 512 recipe's file beside this one, found wherever the command runs from.
_spec = importlib.util.spec_from_file_location("tdm_configs_pixart_alpha",
                                               os.path.join(os.path.dirname(__file__), "pixart_alpha.py"))
pixart_alpha = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pixart_alpha)


def get_config() -> ml_collections.ConfigDict:
  config = pixart_alpha.get_config()
  config.model.reference = "configs/diffusers/pixart-sigma-xl-2-1024-ms"
  config.model.resolution = 1024
  return config
