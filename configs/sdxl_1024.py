"""SDXL stage 2 of the paper's recipe: 1k iterations at 1024 px from stage 1's student.

  python -m tdm_jax.main --config=configs/sdxl_1024.py --workdir=STAGE2 \
      --config.teacher.converted=STAGE1/converted --config.train.init_from=STAGE1 \
      --config.data.prompt_source=prompts.txt

The student's adapters start from STAGE1's latest checkpoint (its EMA when kept); the fake score
is re-initialised from the teacher (fresh zero-effect adapters) and both optimisers start afresh,
as the paper re-initialises the fake score at each stage.
"""

import importlib.util
import os

import ml_collections

# Stage 1's file beside this one, found wherever the command runs from.
_spec = importlib.util.spec_from_file_location("tdm_configs_sdxl", os.path.join(os.path.dirname(__file__), "sdxl.py"))
sdxl = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sdxl)


def get_config() -> ml_collections.ConfigDict:
  config = sdxl.get_config()
  config.model.resolution = 1024
  return config
