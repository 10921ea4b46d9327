"""Diffusers CogVideoXTransformer3DModel state dict <-> our `tdm_jax.models.cogvideox` parameter tree.

Names: `transformer_blocks.3.attn1.to_out.0.weight` is our `transformer_blocks_3/attn1/to_out_0/kernel`,
`transformer_blocks.3.ff.net.0.proj.weight` our `.../ff/net_0/proj/kernel` (a list index joins the name
before it), a LayerNorm's `weight` our `scale` (`transformer_blocks_3/norm1/norm/scale`,
`.../attn1/norm_q/scale`, `norm_final/scale`). Layouts: linear weights (out, in) <-> (in, out), the
patch conv OIHW <-> HWIO. The expected tree is `jax.eval_shape` of init, so every unfilled
parameter, unused tensor and shape mismatch is named before anything is built.

Diffusers keeps 2B's sin-cos table as a non-persistent buffer (not in checkpoints) and 5B's rotary
table is the pipeline's, so there is no position tensor to convert. Our step-count table
(`step_embedding`) has no Diffusers counterpart: `fold_step_embedding` folds one row into
`time_embedding.linear_2`'s bias before export.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Tuple, Union

import flax
import jax
import jax.numpy as jnp
import numpy as np

from tdm_jax.convert import lora as lora_io
from tdm_jax.convert import names
from tdm_jax.convert import step_table
from tdm_jax.convert.errors import ConversionError
from tdm_jax.models.cogvideox import CogVideoXConfig, CogVideoXTransformer3DModel

STEP_EMBEDDING = step_table.STEP_EMBEDDING
STEP_BIAS = ("time_embedding", "linear_2", "bias")
_NORMS = ("norm", "norm_q", "norm_k", "norm_final")  # LayerNorm modules: `weight` is our `scale`
_LIST_RE = names.list_pattern(("transformer_blocks", "to_out", "net"))
_WEIGHTS = ("kernel", "scale")  # our names of Diffusers' `weight`

# The attention projections of every block (one joint attention over text and video), as the
# authors' CogVideoX LoRA and Diffusers' CogVideoX LoRA training (PEFT target_modules to_q, to_k,
# to_v, to_out.0) target them: regexes over our "/"-joined parameter paths.
LORA_TARGETS = (r"(^|/)transformer_blocks_\d+/attn1/(to_q|to_k|to_v|to_out_0)/kernel$",)

ConfigLike = Union[CogVideoXConfig, Mapping[str, Any]]


def _as_config(config: ConfigLike) -> CogVideoXConfig:
  return config if isinstance(config, CogVideoXConfig) else CogVideoXConfig.from_dict(config)


def abstract_params(config: ConfigLike):
  """The model's parameter tree as ShapeDtypeStructs in their logical-axis boxes (`jax.eval_shape` of
  init on one patch of one frame: no FLOPs, no memory)."""
  config = _as_config(config)
  model = CogVideoXTransformer3DModel(config)
  p = config.patch_size
  video = jnp.zeros((1, 1, config.in_channels, p, p), jnp.float32)
  text = jnp.zeros((1, 1, config.text_embed_dim), jnp.float32)
  extra = {}
  if config.num_step_embeds is not None:
    extra["num_steps"] = jnp.zeros((1,), jnp.int32)
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), video, jnp.zeros((1,)), text, **extra))["params"]


def expected_param_shapes(config: ConfigLike) -> Dict[Tuple[str, ...], Tuple[int, ...]]:
  return names.flat_shapes(abstract_params(config))


def our_path(name: str) -> Tuple[str, ...]:
  """'transformer_blocks.0.attn1.to_out.0.weight' -> ('transformer_blocks_0', 'attn1', 'to_out_0', 'kernel');
  'transformer_blocks.0.norm1.norm.weight' -> (..., 'norm1', 'norm', 'scale')."""
  path = names.split_indices(name)
  if path[-1] == "weight":
    return path[:-1] + ("scale" if len(path) > 1 and path[-2] in _NORMS else "kernel",)
  return path


def diffusers_name(path: Tuple[str, ...]) -> str:
  leaf = "weight" if path[-1] in _WEIGHTS else path[-1]
  return names.join_indices(path[:-1] + (leaf,), _LIST_RE)


def cogvideox_params_from_state_dict(state_dict: Mapping[str, np.ndarray], config: ConfigLike) -> Dict[str, Any]:
  """Diffusers CogVideoXTransformer3DModel state dict (name -> array) -> our parameter tree (the "params"
  collection).

  Arrays keep the checkpoint's dtype. Raises ConversionError naming every unused tensor, unfilled
  parameter and shape mismatch (a config with `num_step_embeds` leaves `step_embedding` unfilled:
  convert with the Diffusers config, then add the table).
  """
  return names.tree_from_state_dict(state_dict, expected_param_shapes(config), our_path, diffusers_name,
                                   "CogVideoX transformer checkpoint")


def cogvideox_state_dict_from_params(params: Mapping[str, Any], config: ConfigLike) -> Dict[str, np.ndarray]:
  """Our parameter tree -> Diffusers CogVideoXTransformer3DModel state dict (name -> numpy array), checked
  against config.

  A step-count table has no place in Diffusers' model: fold it first (`fold_step_embedding`).
  """
  config = _as_config(config)
  flat = flax.traverse_util.flatten_dict(flax.core.meta.unbox(flax.core.unfreeze(params)))
  if config.num_step_embeds is not None or any(p[0] == STEP_EMBEDDING for p in flat):
    raise ConversionError("CogVideoX transformer params carry a step-count table (step_embedding / "
                          "num_step_embeds), which Diffusers' model has not: fold one row with fold_step_embedding "
                          "before export")
  return names.state_dict_from_tree(flat, expected_param_shapes(config), diffusers_name, "CogVideoX transformer")


def fold_step_embedding(params: Mapping[str, Any], config: ConfigLike, num_steps: int):
  """(params, config) of the model with one step count K fixed: row K of `step_embedding` added to
  `time_embedding/linear_2/bias` (`convert/step_table.py`), the table and `num_step_embeds` removed."""
  return step_table.fold_into_bias(params, config, num_steps, STEP_BIAS)


def _lora_module(path: Tuple[str, ...]) -> str:
  """Our Dense module path -> its Diffusers module name (the converter names parameters, leaf included)."""
  return diffusers_name(path + ("kernel",))[:-len(".weight")]


# How Diffusers (PEFT) LoRA files name this family's adapters: `transformer.<module>.lora_A/B.weight`
# (CogVideoXPipeline's `load_lora_weights`), the step row of a unified student on the timestep
# embedder's linear_2 (where our model adds it).
LORA_LAYOUT = lora_io.LoraLayout(prefix="transformer", model="CogVideoX transformer",
                                 expected_param_shapes=expected_param_shapes, diffusers_name=_lora_module,
                                 our_path=lambda name: our_path(name + ".weight")[:-1],
                                 step_module=STEP_BIAS[:-1])
