"""SD3.5-Large (MMDiT, 8.06 B parameters, rectified flow) distilled with TDM at 1024 px: configs/sd35_medium.py's
recipe on the large teacher.

  python -m tdm_jax.main --config=configs/sd35_large.py --workdir=DIR \
      --config.teacher.pipeline=/path/to/stable-diffusion-3.5-large --config.data.prompt_source=prompts.txt

Only what differs from configs/sd35_medium.py: the teacher (38 joint blocks of width 2432, RMS
QK-norm, no dual attention) and the resolution, 1024 px, SD3.5-Large's native size and the one its
memory is measured at (benchmarks/README.md: 8 devices on fsdp, global batch 64, LoRA). The recipe is
otherwise the SD3.5-Medium one (4-step LoRA rank 32 / alpha 64 student, lr 1e-5 for both networks,
CFG 4 on the teacher, pseudo-Huber c 1e-3, batch 64): no TDM recipe for SD3.5-Large is published, so
its rates are not tuned for this teacher. `--config.model.resolution=512` runs Flow-Factory's SD3.5
resolution instead (about a quarter of the image tokens, so of the activations and of the time).
"""

import importlib.util
import os

import ml_collections

# The SD3.5-Medium file beside this one, found wherever the command runs from.
_spec = importlib.util.spec_from_file_location("tdm_configs_sd35_medium",
                                               os.path.join(os.path.dirname(__file__), "sd35_medium.py"))
sd35_medium = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sd35_medium)


def get_config() -> ml_collections.ConfigDict:
  config = sd35_medium.get_config()
  config.model.reference = "configs/diffusers/sd3.5-large"
  config.model.resolution = 1024
  return config
