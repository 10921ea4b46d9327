"""The SDXL base UNet at its real size, without weights: jax.eval_shape only."""

import json
import os

import numpy as np

from conftest import REPO

from tdm_jax.convert.unet import expected_param_shapes


def _reference(*parts):
  with open(os.path.join(REPO, "configs", "diffusers", *parts)) as f:
    return json.load(f)


def test_sdxl_unet_parameter_count_equals_diffusers():
  from configs import sdxl  # pylint: disable=g-import-not-at-top
  config = sdxl.get_config()
  unet_config = _reference(os.path.relpath(config.model.reference, "configs/diffusers"), "unet", "config.json")
  ours = sum(int(np.prod(shape)) for shape in expected_param_shapes(unet_config).values())

  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import UNet2DConditionModel  # pylint: disable=g-import-not-at-top
  with torch.device("meta"):
    theirs = sum(p.numel() for p in UNet2DConditionModel.from_config(unet_config).parameters())
  assert ours == theirs == _reference("param_counts.json")["sdxl-base-1.0/unet"]


def test_sd15_unet_parameter_count_equals_diffusers():
  ours = sum(int(np.prod(s)) for s in expected_param_shapes(_reference("sd-1.5", "unet", "config.json")).values())
  assert ours == _reference("param_counts.json")["sd-1.5/unet"]
