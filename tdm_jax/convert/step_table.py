"""A unified student's step-count table folded away for export, shared by the transformer converters.

Our transformer families (PixArt, MMDiT) give a unified student a (K, width) table `step_embedding`
whose row K is added right after one Dense layer of the timestep embedder; stock pipelines pass no
step count, so an exported folder fixes one K by adding that row to the layer's bias: exact, the same
function for that K. (The UNet family folds into Diffusers' class-embedding slot: convert/unet.py.)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Tuple

import flax
import jax.numpy as jnp
import numpy as np

from tdm_jax.convert.errors import ConversionError

STEP_EMBEDDING = "step_embedding"


def fold_into_bias(params: Mapping[str, Any], config: Any, num_steps: int, bias: Tuple[str, ...]):
  """(params, config) with row `num_steps` of `step_embedding` added to the parameter at path `bias`, the
  table and `num_step_embeds` removed. `config` comes back as it came: a dict without "num_step_embeds",
  or the family's config dataclass with None."""
  flat = dict(flax.traverse_util.flatten_dict(flax.core.meta.unbox(flax.core.unfreeze(params))))
  table = flat.pop((STEP_EMBEDDING, "embedding"), None)
  if table is None:
    raise ConversionError("fold_step_embedding: params have no step_embedding/embedding table")
  if not 0 <= num_steps < np.shape(table)[0]:
    raise ConversionError(f"fold_step_embedding: num_steps={num_steps} is not a row of the "
                          f"{np.shape(table)[0]}-row step table")
  value = flat[bias]
  flat[bias] = (jnp.asarray(value, jnp.float32) + jnp.asarray(table[num_steps], jnp.float32)).astype(value.dtype)
  if dataclasses.is_dataclass(config):
    folded = dataclasses.replace(config, num_step_embeds=None)
  else:
    folded = {k: v for k, v in config.items() if k != "num_step_embeds"}
  return flax.traverse_util.unflatten_dict(flat), folded
