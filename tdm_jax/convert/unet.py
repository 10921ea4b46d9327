"""Diffusers UNet2DConditionModel state dict <-> our `tdm_jax.models.unet` parameter tree.

Names: Diffusers' `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight` is our
`down_blocks_1/attentions_0/transformer_blocks_0/attn1/to_q/kernel` (a list index joins the name
before it). Layouts: conv weights OIHW <-> HWIO, linear weights (out, in) <-> (in, out), norm
`weight` <-> `scale`. The expected tree is `jax.eval_shape` of the model's init, so every mismatch
is caught and named before anything is built.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Tuple, Union

import flax
import jax
import jax.numpy as jnp
import numpy as np

from tdm_jax.models.unet import UNet2DConditionModel, UNetConfig
from tdm_jax.convert import lora as lora_io
from tdm_jax.convert import names
from tdm_jax.convert.errors import ConversionError, check_conversion, check_params_match

# Diffusers containers whose children are indexed (`resnets.0`); ours are `resnets_0`.
_LISTS = ("down_blocks", "up_blocks", "resnets", "attentions", "transformer_blocks",
          "downsamplers", "upsamplers", "to_out", "net")
_WEIGHTS = ("kernel", "scale", "embedding")  # our names of Diffusers' `weight`
_LIST_RE = names.list_pattern(_LISTS)


def _as_config(config: Union[UNetConfig, Mapping[str, Any]]) -> UNetConfig:
  return config if isinstance(config, UNetConfig) else UNetConfig.from_dict(config)


def abstract_params(config: Union[UNetConfig, Mapping[str, Any]]):
  """The UNet's parameter tree as ShapeDtypeStructs in their logical-axis boxes (`jax.eval_shape` of
  init: no FLOPs, no memory)."""
  config = _as_config(config)
  model = UNet2DConditionModel(config)
  h = w = 2 ** (len(config.block_out_channels) - 1)
  sample = jnp.zeros((1, config.in_channels, h, w), jnp.float32)
  context = jnp.zeros((1, 1, config.cross_attention_dim), jnp.float32)
  added = None
  if config.addition_embed_type == "text_time":
    text_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    added = {"text_embeds": jnp.zeros((1, text_dim)), "time_ids": jnp.zeros((1, 6))}
  labels = None if config.num_class_embeds is None else jnp.zeros((1,), jnp.int32)
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), sample, jnp.zeros((1,)), context, added,
                                           labels))["params"]


def expected_param_shapes(config: Union[UNetConfig, Mapping[str, Any]]) -> Dict[Tuple[str, ...], Tuple[int, ...]]:
  """Flattened {path: shape} of the UNet's parameters, from `jax.eval_shape` of init (no FLOPs)."""
  return names.flat_shapes(abstract_params(config))


# 'down_blocks.0.resnets.1.norm1.weight' -> ('down_blocks_0', 'resnets_1', 'norm1', 'weight').
our_path = names.split_indices


def diffusers_name(path: Tuple[str, ...]) -> str:
  return names.join_indices(path, _LIST_RE)


def _leaf_candidates(prefix: Tuple[str, ...], leaf: str):
  if leaf == "weight":
    return [prefix + ("kernel",), prefix + ("scale",), prefix + ("embedding",)]
  if leaf == "bias":
    return [prefix + ("bias",)]
  return []


# Axis orders from Diffusers' layout to ours, by rank: conv OIHW -> HWIO, linear (out, in) -> (in, out).
# Embedding tables (`embedding` leaves) are (rows, features) in both.
_TO_OURS = {4: (2, 3, 1, 0), 2: (1, 0)}
_TO_TORCH = {4: (3, 2, 0, 1), 2: (1, 0)}


def _axes(path: Tuple[str, ...], ndim: int, orders) -> Tuple[int, ...]:
  return tuple(range(ndim)) if path[-1] == "embedding" else orders.get(ndim, tuple(range(ndim)))


def _torch_shape(path: Tuple[str, ...], shape: Tuple[int, ...]) -> Tuple[int, ...]:
  """The Diffusers-layout shape of one of our parameters."""
  return tuple(shape[i] for i in _axes(path, len(shape), _TO_TORCH))


def _to_ours(path: Tuple[str, ...], value: np.ndarray) -> np.ndarray:
  return np.transpose(value, _axes(path, value.ndim, _TO_OURS))


def _to_torch(path: Tuple[str, ...], value: np.ndarray) -> np.ndarray:
  return np.transpose(value, _axes(path, value.ndim, _TO_TORCH))


def unet_params_from_state_dict(state_dict: Mapping[str, np.ndarray],
                                config: Union[UNetConfig, Mapping[str, Any]]) -> Dict[str, Any]:
  """Diffusers UNet state dict (name -> array) -> our parameter tree (the "params" collection).

  Use as `model.apply({"params": params}, ...)`. Arrays keep the checkpoint's dtype. Raises
  ConversionError naming every unused tensor, every unfilled parameter and every shape mismatch.
  """
  expected = expected_param_shapes(config)
  filled: Dict[Tuple[str, ...], np.ndarray] = {}
  unused, mismatched = [], []
  for name in sorted(state_dict):
    parts = our_path(name)
    target = next((p for p in _leaf_candidates(parts[:-1], parts[-1]) if p in expected), None)
    if target is None:
      unused.append(name)
      continue
    value = np.asarray(state_dict[name])
    want = _torch_shape(target, expected[target])
    if tuple(value.shape) != want:
      mismatched.append(f"{name}: expected {want}, got {tuple(value.shape)}")
      continue
    filled[target] = _to_ours(target, value)
  unfilled = sorted(diffusers_name(p[:-1] + ("weight" if p[-1] in _WEIGHTS else p[-1],))
                    for p in expected if p not in filled)
  unfilled = [n for n in unfilled if not any(m.startswith(n + ":") for m in mismatched)]
  check_conversion("UNet checkpoint", unfilled=unfilled, unused=unused, mismatched=mismatched,
                   hint="Check that config.json belongs to these weights.")
  return flax.traverse_util.unflatten_dict(filled)


def unet_state_dict_from_params(params: Mapping[str, Any],
                                config: Union[UNetConfig, Mapping[str, Any]]) -> Dict[str, np.ndarray]:
  """Our parameter tree -> Diffusers UNet state dict (name -> numpy array), checked against config."""
  expected = expected_param_shapes(config)
  flat = flax.traverse_util.flatten_dict(flax.core.meta.unbox(flax.core.unfreeze(params)))
  check_params_match("UNet", flat, expected)
  out = {}
  for path, value in flat.items():
    leaf = "weight" if path[-1] in _WEIGHTS else path[-1]
    out[diffusers_name(path[:-1] + (leaf,))] = _to_torch(path, np.asarray(jax.device_get(value)))
  return out


# --- what a TDM student's UNet becomes in an exported folder ------------------------------------

GUIDANCE_EMBED_DIM = 256  # LCM-SDXL's time_cond_proj_dim
STEP_EMBEDDING = "class_embedding"  # the unified student's K table: Diffusers' class embedding slot


def guidance_free(params: Mapping[str, Any], unet_config: Mapping[str, Any]):
  """(params, config) of a UNet that stock pipelines run without CFG: LCM's `time_cond_proj_dim`
  with an all-zero projection, so the guidance embedding they pass changes nothing."""
  params = dict(params)
  embedding = dict(params["time_embedding"])
  width = int(np.shape(embedding["linear_1"]["kernel"])[0])
  embedding["cond_proj"] = {"kernel": np.zeros((GUIDANCE_EMBED_DIM, width), np.float32)}
  params["time_embedding"] = embedding
  return params, {**unet_config, "time_cond_proj_dim": GUIDANCE_EMBED_DIM}


def step_row(table, num_steps: int) -> np.ndarray:
  """Row K of a unified student's step table (float32), or an error naming the rows it has."""
  table = np.asarray(table, np.float32)
  if not 0 <= num_steps < table.shape[0]:
    raise ConversionError(f"the student's step table has rows 0..{table.shape[0] - 1}; cannot fold K={num_steps}")
  return table[num_steps]


def fold_step_embedding(params: Mapping[str, Any], unet_config: Mapping[str, Any], num_steps: int):
  """(params, config) of the unified student fixed at K = num_steps: row K of its step table added
  to the time embedding's output bias (exact: Diffusers adds the class embedding right after it),
  the table and `num_class_embeds` removed."""
  params = dict(params)
  row = step_row(params.pop(STEP_EMBEDDING)["embedding"], num_steps)
  embedding = dict(params["time_embedding"])
  last = dict(embedding["linear_2"])
  last["bias"] = np.asarray(last["bias"], np.float32) + row
  embedding["linear_2"] = last
  params["time_embedding"] = embedding
  config = {k: v for k, v in unet_config.items() if k != "num_class_embeds"}
  return params, config


# How Diffusers (PEFT) LoRA files name this family's adapters (`convert/lora.py`): `unet.<module>.lora_A/B.weight`
# (SD 1.x / 2.x / SDXL pipelines' `load_lora_weights`), the step row of a unified student on
# `time_embedding.linear_2`, where Diffusers adds the class embedding. The UNet's kohya / SGM layout
# (ComfyUI, A1111) is `convert/kohya.py`.
LORA_LAYOUT = lora_io.LoraLayout(prefix="unet", model="UNet", expected_param_shapes=expected_param_shapes,
                                 diffusers_name=diffusers_name, our_path=our_path,
                                 step_module=("time_embedding", "linear_2"))
