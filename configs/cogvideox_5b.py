"""CogVideoX-5B (3-D rotary positions, 48 heads x 42 layers, VAE scaling 0.7, snr_shift_scale 1) distilled
with TDM into a 4-step LoRA student, with configs/cogvideox_2b.py's recipe (see there).

  python -m tdm_jax.main --config=configs/cogvideox_5b.py --workdir=DIR \
      --config.teacher.pipeline=/path/to/CogVideoX-5b --config.data.prompt_source=prompts.txt
"""

import importlib.util
import os

import ml_collections

# The 2B file beside this one, found wherever the command runs from.
_spec = importlib.util.spec_from_file_location("tdm_configs_cogvideox_2b",
                                               os.path.join(os.path.dirname(__file__), "cogvideox_2b.py"))
cogvideox_2b = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cogvideox_2b)


def get_config() -> ml_collections.ConfigDict:
  return cogvideox_2b.get_config(reference="configs/diffusers/cogvideox-5b")
