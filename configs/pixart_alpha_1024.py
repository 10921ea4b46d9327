"""PixArt-alpha XL-2 1024-MS distilled with TDM: configs/pixart_alpha.py's recipe at 1024 px.

  python -m tdm_jax.main --config=configs/pixart_alpha_1024.py --workdir=DIR \
      --config.teacher.pipeline=/path/to/PixArt-XL-2-1024-MS --config.data.prompt_source=prompts.txt

The 1024-MS transformer also reads the image's resolution and aspect ratio (square 1024 here); the
rest is the 512 recipe. At 4096 image tokens per sample, LoRA (`--config.model.lora_rank=64`) and a
smaller batch suit a single accelerator.
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
  config.model.reference = "configs/diffusers/pixart-alpha-xl-2-1024-ms"
  config.model.resolution = 1024
  return config
