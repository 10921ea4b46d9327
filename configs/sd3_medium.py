"""SD3-Medium (MMDiT, rectified flow) distilled with TDM: configs/sd35_medium.py's recipe on SD3's first
medium model.

  python -m tdm_jax.main --config=configs/sd3_medium.py --workdir=DIR \
      --config.teacher.pipeline=/path/to/stable-diffusion-3-medium-diffusers --config.data.prompt_source=prompts.txt

Only the teacher differs: 24 joint blocks without SD3.5-Medium's dual attention and RMS QK-norm
(2.03 B parameters against 2.24 B), the same three text encoders, 16-channel VAE and
FlowMatchEulerDiscreteScheduler (shift 3.0). The recipe (4-step LoRA rank 32 / alpha 64 student, lr
1e-5 for both networks, CFG 4 on the teacher, pseudo-Huber c 1e-3, 512 px, batch 64) is Flow-Factory's
for SD3.5-Medium, taken over unchanged: no TDM recipe for SD3-Medium is published, so its rates are not
tuned for this teacher (configs/sd35_medium.py says why the two rates are equal).
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
  config.model.reference = "configs/diffusers/sd3-medium"
  return config
