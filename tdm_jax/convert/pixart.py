"""Diffusers PixArtTransformer2DModel state dict <-> our `tdm_jax.models.pixart` parameter tree.

Names: `transformer_blocks.3.attn1.to_out.0.weight` is our `transformer_blocks_3/attn1/to_out_0/kernel`,
`transformer_blocks.3.ff.net.0.proj.weight` our `.../ff/net_0/proj/kernel` (a list index joins the
name before it). Layouts: linear weights (out, in) <-> (in, out), the patch conv OIHW <-> HWIO; the
`scale_shift_table`s keep theirs. The expected tree is `jax.eval_shape` of init, so every unfilled
parameter, unused tensor and shape mismatch is named before anything is built. Our step-count
table (`step_embedding`) has no Diffusers counterpart: `fold_step_embedding` folds one row into
`timestep_embedder.linear_2`'s bias before export.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Tuple, Union

import flax
import jax
import jax.numpy as jnp
import numpy as np

from tdm_jax.convert import names
from tdm_jax.convert import step_table
from tdm_jax.convert.errors import ConversionError
from tdm_jax.models.pixart import PixArtConfig, PixArtTransformer2DModel

STEP_EMBEDDING = step_table.STEP_EMBEDDING
STEP_BIAS = ("adaln_single", "emb", "timestep_embedder", "linear_2", "bias")
_LIST_RE = names.list_pattern(("transformer_blocks", "to_out", "net"))
_RENAMED = {"kernel": "weight"}  # our leaf -> Diffusers' (others keep their names)

ConfigLike = Union[PixArtConfig, Mapping[str, Any]]


def _as_config(config: ConfigLike) -> PixArtConfig:
  return config if isinstance(config, PixArtConfig) else PixArtConfig.from_dict(config)


def abstract_params(config: ConfigLike):
  """The model's parameter tree as ShapeDtypeStructs in their logical-axis boxes (`jax.eval_shape` of
  init on one patch: no FLOPs, no memory)."""
  config = _as_config(config)
  model = PixArtTransformer2DModel(config)
  p = config.patch_size
  sample = jnp.zeros((1, config.in_channels, p, p), jnp.float32)
  caption = jnp.zeros((1, 1, config.caption_channels), jnp.float32)
  extra = {}
  if config.use_additional_conditions:
    extra.update(resolution=jnp.zeros((1, 2)), aspect_ratio=jnp.zeros((1, 1)))
  if config.num_step_embeds is not None:
    extra["num_steps"] = jnp.zeros((1,), jnp.int32)
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), sample, jnp.zeros((1,)), caption,
                                           **extra))["params"]


def expected_param_shapes(config: ConfigLike) -> Dict[Tuple[str, ...], Tuple[int, ...]]:
  return names.flat_shapes(abstract_params(config))


def our_path(name: str) -> Tuple[str, ...]:
  """'transformer_blocks.0.attn1.to_out.0.weight' -> ('transformer_blocks_0', 'attn1', 'to_out_0', 'kernel')."""
  path = names.split_indices(name)
  return path[:-1] + ("kernel",) if path[-1] == "weight" else path


def diffusers_name(path: Tuple[str, ...]) -> str:
  return names.join_indices(path[:-1] + (_RENAMED.get(path[-1], path[-1]),), _LIST_RE)


def pixart_params_from_state_dict(state_dict: Mapping[str, np.ndarray], config: ConfigLike) -> Dict[str, Any]:
  """Diffusers PixArt state dict (name -> array) -> our parameter tree (the "params" collection).

  Arrays keep the checkpoint's dtype. Raises ConversionError naming every unused tensor, unfilled
  parameter and shape mismatch (a config with `num_step_embeds` leaves `step_embedding` unfilled:
  convert with the Diffusers config, then add the table).
  """
  return names.tree_from_state_dict(state_dict, expected_param_shapes(config), our_path, diffusers_name,
                                   "PixArt transformer checkpoint")


def pixart_state_dict_from_params(params: Mapping[str, Any], config: ConfigLike) -> Dict[str, np.ndarray]:
  """Our parameter tree -> Diffusers PixArt state dict (name -> numpy array), checked against config.

  A step-count table has no place in Diffusers' model: fold it first (`fold_step_embedding`).
  """
  config = _as_config(config)
  flat = flax.traverse_util.flatten_dict(flax.core.meta.unbox(flax.core.unfreeze(params)))
  if config.num_step_embeds is not None or any(p[0] == STEP_EMBEDDING for p in flat):
    raise ConversionError("PixArt params carry a step-count table (step_embedding / num_step_embeds), which "
                          "Diffusers' model has not: fold one row with fold_step_embedding before export")
  return names.state_dict_from_tree(flat, expected_param_shapes(config), diffusers_name, "PixArt")


def fold_step_embedding(params: Mapping[str, Any], config: ConfigLike, num_steps: int):
  """(params, config) of the model with one step count K fixed: row K of `step_embedding` added to
  `adaln_single/emb/timestep_embedder/linear_2/bias`
  (`convert/step_table.py`), the table and `num_step_embeds` removed."""
  return step_table.fold_into_bias(params, config, num_steps, STEP_BIAS)