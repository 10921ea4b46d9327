"""Diffusers AutoencoderKL state dict <-> our Flax `AutoencoderKL` parameter tree.

Our submodule names mirror Diffusers' with dots before indices turned into underscores
(`encoder.down_blocks.0.resnets.0.norm1.weight` <-> encoder/down_blocks_0_resnets_0/norm1/scale).
Conv weights OIHW <-> HWIO, linear weights transposed, norm `weight` <-> `scale`.
"""

from __future__ import annotations

import re
from typing import Any, Dict, Mapping, Tuple, Union

import jax
import numpy as np
from flax import traverse_util

from tdm_jax.models.vae import AutoencoderKL, VAEConfig
from tdm_jax.convert.errors import check_conversion, check_params_match

ConfigLike = Union[VAEConfig, Mapping[str, Any]]


def _as_config(config: ConfigLike) -> VAEConfig:
  return config if isinstance(config, VAEConfig) else VAEConfig.from_dict(config)


def _diffusers_name(path: Tuple[str, ...]) -> str:
  """Our parameter path -> the Diffusers tensor name."""
  *modules, leaf = path
  name = re.sub(r"_(\d+)(?=[_.]|$)", r".\1", ".".join(modules))  # blocks_0 -> blocks.0
  name = re.sub(r"(\.\d+)_", r"\1.", name)  # blocks.0_resnets -> blocks.0.resnets
  if leaf in ("kernel", "scale"):
    return f"{name}.weight"
  if leaf == "bias":
    return f"{name}.bias"
  raise ValueError(f"unexpected parameter leaf {'/'.join(path)!r}")


def _to_flax(leaf: str, array: np.ndarray) -> np.ndarray:
  if leaf == "kernel" and array.ndim == 4:
    return np.transpose(array, (2, 3, 1, 0))  # OIHW -> HWIO
  if leaf == "kernel" and array.ndim == 2:
    return np.transpose(array)  # (out, in) -> (in, out)
  return array


def _to_torch(leaf: str, array: np.ndarray) -> np.ndarray:
  if leaf == "kernel" and array.ndim == 4:
    return np.transpose(array, (3, 2, 0, 1))  # HWIO -> OIHW
  if leaf == "kernel" and array.ndim == 2:
    return np.transpose(array)
  return array


def expected_param_shapes(config: ConfigLike) -> Dict[Tuple[str, ...], jax.ShapeDtypeStruct]:
  """Flat {path: ShapeDtypeStruct} of our parameter tree, from `jax.eval_shape` of init."""
  model = AutoencoderKL(_as_config(config))
  abstract = jax.eval_shape(lambda: model.init_params(jax.random.PRNGKey(0)))
  return traverse_util.flatten_dict(abstract)


def vae_params_from_state_dict(state_dict: Mapping[str, np.ndarray], config: ConfigLike,
                               dtype: Any = np.float32):
  """Diffusers AutoencoderKL tensors (name -> array) -> our (unboxed) Flax params tree.

  Raises ValueError naming every checkpoint tensor left unused, every parameter left unfilled
  and every shape mismatch (name, expected, got).
  """
  expected = expected_param_shapes(config)
  flat, used = {}, set()
  missing, mismatched = [], []
  for path, spec in sorted(expected.items()):
    name = _diffusers_name(path)
    if name not in state_dict:
      missing.append(f"{name} (for {'/'.join(path)}, shape {tuple(spec.shape)})")
      continue
    used.add(name)
    value = _to_flax(path[-1], np.asarray(state_dict[name]))
    if tuple(value.shape) != tuple(spec.shape):
      torch_shape = tuple(np.asarray(state_dict[name]).shape)
      want = _to_torch(path[-1], np.empty(spec.shape, np.int8)).shape
      mismatched.append(f"{name}: expected {tuple(want)}, got {torch_shape}")
      continue
    flat[path] = value.astype(dtype)
  unused = sorted(set(state_dict) - used)
  check_conversion("VAE checkpoint", unfilled=missing,
                   unused=[f"{u} {tuple(np.shape(state_dict[u]))}" for u in unused], mismatched=mismatched,
                   hint="Check that config.json belongs to these weights.")
  return traverse_util.unflatten_dict(flat)


def vae_state_dict_from_params(params, config: ConfigLike) -> Dict[str, np.ndarray]:
  """Our Flax params tree -> Diffusers AutoencoderKL tensors (name -> numpy array)."""
  expected = expected_param_shapes(config)
  flat = traverse_util.flatten_dict(params)
  check_params_match("VAE", flat, expected)
  out = {}
  for path, value in flat.items():
    value = np.asarray(value)
    if tuple(value.shape) != tuple(expected[path].shape):
      raise ValueError(f"VAE param {'/'.join(path)}: expected {tuple(expected[path].shape)}, "
                       f"got {tuple(value.shape)}")
    out[_diffusers_name(path)] = np.ascontiguousarray(_to_torch(path[-1], value))
  return out
