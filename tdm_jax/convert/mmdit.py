"""Diffusers SD3Transformer2DModel state dict <-> our `tdm_jax.models.mmdit` parameter tree.

Names: `transformer_blocks.3.attn.to_out.0.weight` is our `transformer_blocks_3/attn/to_out_0/kernel`,
`transformer_blocks.3.ff_context.net.0.proj.weight` our `.../ff_context/net_0/proj/kernel` (a list
index joins the name before it), the QK RMS norms' `weight` our `scale`
(`transformer_blocks_3/attn/norm_added_q/scale`). Layouts: linear weights (out, in) <-> (in, out),
the patch conv OIHW <-> HWIO. The expected tree is `jax.eval_shape` of init, so every unfilled
parameter, unused tensor and shape mismatch is named before anything is built.

Diffusers' persistent buffer `pos_embed.pos_embed` (the fixed sin-cos table of pos_embed_max_size^2
positions) is no parameter of ours: the model computes it. A checkpoint's table is checked against
ours (to its dtype's rounding) and a different one is named as a mismatch; an export writes ours.
Our step-count table (`step_embedding`) has no Diffusers counterpart: `fold_step_embedding` folds one
row into `time_text_embed.timestep_embedder.linear_2`'s bias before export.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple, Union

import flax
import jax
import jax.numpy as jnp
import numpy as np

from tdm_jax.convert import lora as lora_io
from tdm_jax.convert import names
from tdm_jax.convert import step_table
from tdm_jax.convert.errors import ConversionError
from tdm_jax.models.mmdit import MMDiTConfig, SD3Transformer2DModel, axis_embedding, cropped_pos_embed

STEP_EMBEDDING = step_table.STEP_EMBEDDING
STEP_BIAS = ("time_text_embed", "timestep_embedder", "linear_2", "bias")
POS_TABLE = "pos_embed.pos_embed"  # Diffusers' buffer: checked and written, never a parameter
_NORMS = ("norm_q", "norm_k", "norm_added_q", "norm_added_k")  # RMSNorm modules: `weight` is our `scale`
_LIST_RE = names.list_pattern(("transformer_blocks", "to_out", "net"))
_WEIGHTS = ("kernel", "scale")  # our names of Diffusers' `weight`

# The attention projections of the joint `attn` (image and text streams) and of SD3.5-Medium's `attn2`,
# as Diffusers' SD3 LoRA training (PEFT) targets them: regexes over our "/"-joined parameter paths.
LORA_TARGETS = (
    r"(^|/)transformer_blocks_\d+/attn2?/(to_q|to_k|to_v|to_out_0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"/kernel$",
)

ConfigLike = Union[MMDiTConfig, Mapping[str, Any]]


def _as_config(config: ConfigLike) -> MMDiTConfig:
  return config if isinstance(config, MMDiTConfig) else MMDiTConfig.from_dict(config)


def abstract_params(config: ConfigLike):
  """The model's parameter tree as ShapeDtypeStructs in their logical-axis boxes (`jax.eval_shape` of
  init on one patch: no FLOPs, no memory)."""
  config = _as_config(config)
  model = SD3Transformer2DModel(config)
  p = config.patch_size
  sample = jnp.zeros((1, config.in_channels, p, p), jnp.float32)
  context = jnp.zeros((1, 1, config.joint_attention_dim), jnp.float32)
  pooled = jnp.zeros((1, config.pooled_projection_dim), jnp.float32)
  extra = {}
  if config.num_step_embeds is not None:
    extra["num_steps"] = jnp.zeros((1,), jnp.int32)
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), sample, jnp.zeros((1,)), context, pooled,
                                           **extra))["params"]


def expected_param_shapes(config: ConfigLike) -> Dict[Tuple[str, ...], Tuple[int, ...]]:
  return names.flat_shapes(abstract_params(config))


def our_path(name: str) -> Tuple[str, ...]:
  """'transformer_blocks.0.attn.to_out.0.weight' -> ('transformer_blocks_0', 'attn', 'to_out_0', 'kernel');
  'transformer_blocks.0.attn.norm_q.weight' -> (..., 'norm_q', 'scale')."""
  path = names.split_indices(name)
  if path[-1] == "weight":
    return path[:-1] + ("scale" if len(path) > 1 and path[-2] in _NORMS else "kernel",)
  return path


def diffusers_name(path: Tuple[str, ...]) -> str:
  leaf = "weight" if path[-1] in _WEIGHTS else path[-1]
  return names.join_indices(path[:-1] + (leaf,), _LIST_RE)


def full_pos_table(config: MMDiTConfig) -> np.ndarray:
  """Diffusers' `pos_embed.pos_embed` buffer for `config`: (1, max^2, inner) float32."""
  size = config.pos_embed_max_size
  table = cropped_pos_embed(config.inner_dim, size, config.base_size, size, size)
  return table[None]


def _pos_table_mismatch(value: np.ndarray, config: MMDiTConfig) -> Optional[str]:
  """None if a checkpoint's `pos_embed.pos_embed` is our table (to its dtype's rounding), else the line
  naming how it differs. Compared one row of the grid at a time (the table is up to 384^2 x 2432)."""
  size, dim = config.pos_embed_max_size, config.inner_dim
  want = (1, size * size, dim)
  if tuple(value.shape) != want:
    return f"{POS_TABLE}: expected {want}, got {tuple(value.shape)}"
  dtype = jnp.dtype(value.dtype)
  tol = max(1e-4, float(jnp.finfo(dtype).eps)) if jnp.issubdtype(dtype, jnp.floating) else 1e-4
  axis = axis_embedding(dim, size, config.base_size)
  grid = value.reshape(size, size, dim)
  half = dim // 2
  worst = 0.0
  for r in range(size):
    row = np.asarray(grid[r], np.float64)
    worst = max(worst, float(np.max(np.abs(row[:, :half] - axis))), float(np.max(np.abs(row[:, half:] - axis[r]))))
  if worst > tol:
    return (f"{POS_TABLE}: differs from the sin-cos table this model computes (pos_embed_max_size={size}, "
            f"base_size={config.base_size}) by up to {worst:.3g} (tolerance {tol:.3g} for {dtype.name})")
  return None


def mmdit_params_from_state_dict(state_dict: Mapping[str, np.ndarray], config: ConfigLike) -> Dict[str, Any]:
  """Diffusers SD3Transformer2DModel state dict (name -> array) -> our parameter tree (the "params" collection).

  Arrays keep the checkpoint's dtype. Raises ConversionError naming every unused tensor, unfilled
  parameter and shape mismatch (a config with `num_step_embeds` leaves `step_embedding` unfilled:
  convert with the Diffusers config, then add the table). `pos_embed.pos_embed`, if there, must be
  the table the model computes; if absent, Diffusers too computes it.
  """
  config = _as_config(config)
  expected = expected_param_shapes(config)
  table = {k: v for k, v in state_dict.items() if k == POS_TABLE and config.pos_embed_max_size is not None}
  line = _pos_table_mismatch(np.asarray(table[POS_TABLE]), config) if table else None
  weights = {k: v for k, v in state_dict.items() if k not in table}
  return names.tree_from_state_dict(weights, expected, our_path, diffusers_name, "SD3 transformer checkpoint",
                                    mismatched=[line] if line else [])


def mmdit_state_dict_from_params(params: Mapping[str, Any], config: ConfigLike) -> Dict[str, np.ndarray]:
  """Our parameter tree -> Diffusers SD3Transformer2DModel state dict (name -> numpy array), checked
  against config, with the `pos_embed.pos_embed` buffer (float32) when the config has pos_embed_max_size.

  A step-count table has no place in Diffusers' model: fold it first (`fold_step_embedding`).
  """
  config = _as_config(config)
  flat = flax.traverse_util.flatten_dict(flax.core.meta.unbox(flax.core.unfreeze(params)))
  if config.num_step_embeds is not None or any(p[0] == STEP_EMBEDDING for p in flat):
    raise ConversionError("SD3 transformer params carry a step-count table (step_embedding / num_step_embeds), "
                          "which Diffusers' model has not: fold one row with fold_step_embedding before export")
  out = names.state_dict_from_tree(flat, expected_param_shapes(config), diffusers_name, "SD3 transformer")
  if config.pos_embed_max_size is not None:
    out[POS_TABLE] = full_pos_table(config)
  return out


def fold_step_embedding(params: Mapping[str, Any], config: ConfigLike, num_steps: int):
  """(params, config) of the model with one step count K fixed: row K of `step_embedding` added to
  `time_text_embed/timestep_embedder/linear_2/bias`
  (`convert/step_table.py`), the table and `num_step_embeds` removed."""
  return step_table.fold_into_bias(params, config, num_steps, STEP_BIAS)


def _lora_module(path: Tuple[str, ...]) -> str:
  """Our Dense module path -> its Diffusers module name (the converter names parameters, leaf included)."""
  return diffusers_name(path + ("kernel",))[:-len(".weight")]


# How Diffusers (PEFT) LoRA files name this family's adapters: `transformer.<module>.lora_A/B.weight`, the
# step row of a unified student on the timestep embedder's linear_2 (where our model adds it).
LORA_LAYOUT = lora_io.LoraLayout(prefix="transformer", model="SD3 transformer",
                                 expected_param_shapes=expected_param_shapes, diffusers_name=_lora_module,
                                 our_path=lambda name: our_path(name + ".weight")[:-1],
                                 step_module=STEP_BIAS[:-1])
