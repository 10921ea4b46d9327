"""Diffusers AutoencoderKLCogVideoX state dict <-> our Flax `AutoencoderKLCogVideoX` parameter tree.

Our module names are Diffusers' with list indices joined to the list name
(`encoder.down_blocks.0.resnets.0.conv1.conv.weight` <-> encoder/down_blocks_0/resnets_0/conv1/conv/kernel).
Conv3d weights (O, I, T, H, W) <-> (T, H, W, I, O); the samplers' Conv2d weights OIHW <-> HWIO; norm
`weight` <-> `scale`. The tree is driven by our module (`jax.eval_shape` of init), so every tensor the
config implies is checked for presence and shape, and every checkpoint tensor left over is named.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, Mapping, Tuple, Union

import numpy as np
from flax import traverse_util

from tdm_jax.convert import names
from tdm_jax.convert.errors import check_conversion, check_params_match
from tdm_jax.models.vae_cogvideox import AutoencoderKLCogVideoX, CogVideoXVAEConfig

ConfigLike = Union[CogVideoXVAEConfig, Mapping[str, Any]]
_LISTS = names.list_pattern(("down_blocks", "up_blocks", "resnets", "downsamplers", "upsamplers"))
# Our kernel layout from Diffusers', by rank; the inverse permutations export.
_TO_FLAX = {5: (2, 3, 4, 1, 0), 4: (2, 3, 1, 0)}
_TO_TORCH = {5: (4, 3, 0, 1, 2), 4: (3, 2, 0, 1)}


def _as_config(config: ConfigLike) -> CogVideoXVAEConfig:
  return config if isinstance(config, CogVideoXVAEConfig) else CogVideoXVAEConfig.from_dict(config)


def _diffusers_name(path: Tuple[str, ...]) -> str:
  """Our parameter path -> the Diffusers tensor name."""
  *modules, leaf = path
  if leaf not in ("kernel", "scale", "bias"):
    raise ValueError(f"unexpected parameter leaf {'/'.join(path)!r}")
  return f"{names.join_indices(tuple(modules), _LISTS)}.{'bias' if leaf == 'bias' else 'weight'}"


def _to_flax(leaf: str, array: np.ndarray) -> np.ndarray:
  return np.transpose(array, _TO_FLAX[array.ndim]) if leaf == "kernel" and array.ndim in _TO_FLAX else array


def _to_torch(leaf: str, array: np.ndarray) -> np.ndarray:
  return np.transpose(array, _TO_TORCH[array.ndim]) if leaf == "kernel" and array.ndim in _TO_TORCH else array


def abstract_params(config: ConfigLike):
  """Our parameter tree as boxed ShapeDtypeStructs carrying logical axis names (no memory used)."""
  return AutoencoderKLCogVideoX(_as_config(config)).abstract_variables()["params"]


@functools.lru_cache(maxsize=8)
def _flat_shapes(config: CogVideoXVAEConfig) -> Tuple[Tuple[Tuple[str, ...], Tuple[int, ...]], ...]:
  return tuple(names.flat_shapes(abstract_params(config)).items())


def expected_param_shapes(config: ConfigLike) -> Dict[Tuple[str, ...], Tuple[int, ...]]:
  """Flat {path: shape} of our parameter tree (traced once per config: an import and its export share it)."""
  return dict(_flat_shapes(_as_config(config)))


def params_from_state_dict(state: Mapping[str, Any], config_dict: ConfigLike, dtype: Any = np.float32):
  """Diffusers AutoencoderKLCogVideoX tensors (name -> array) -> our (unboxed) Flax params tree.

  Raises ConversionError naming every checkpoint tensor left unused, every parameter left unfilled and every
  shape mismatch (name, expected, got, in Diffusers' layout)."""
  expected = expected_param_shapes(config_dict)
  flat, missing, mismatched = {}, [], []
  for path, shape in sorted(expected.items()):
    name = _diffusers_name(path)
    if name not in state:
      missing.append(f"{name} (for {'/'.join(path)}, shape {_to_torch(path[-1], np.empty(shape, np.int8)).shape})")
      continue
    value = np.asarray(state[name])
    if _to_flax(path[-1], value).shape != shape:
      want = _to_torch(path[-1], np.empty(shape, np.int8)).shape
      mismatched.append(f"{name}: expected {tuple(want)}, got {tuple(value.shape)}")
      continue
    flat[path] = _to_flax(path[-1], value).astype(dtype)
  used = {_diffusers_name(p) for p in expected}
  unused = sorted(set(state) - used)
  check_conversion("CogVideoX VAE checkpoint", unfilled=missing,
                   unused=[f"{u} {tuple(np.shape(state[u]))}" for u in unused], mismatched=mismatched,
                   hint="Check that config.json belongs to these weights.")
  return traverse_util.unflatten_dict(flat)


def state_dict_from_params(params, config_dict: ConfigLike) -> Dict[str, np.ndarray]:
  """Our Flax params tree -> Diffusers AutoencoderKLCogVideoX tensors (name -> numpy array)."""
  expected = expected_param_shapes(config_dict)
  flat = traverse_util.flatten_dict(params)
  check_params_match("CogVideoX VAE", flat, expected)
  return {_diffusers_name(path): np.ascontiguousarray(_to_torch(path[-1], np.asarray(value)))
          for path, value in flat.items()}
