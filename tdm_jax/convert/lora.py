"""Our UNet LoRA adapters <-> a safetensors LoRA file that Diffusers loads.

The file is in the PEFT layout Diffusers' `load_lora_weights` / `UNet2DConditionModel.load_lora_adapter`
read (and write with `save_lora_weights`):

    unet.<module>.lora_A.weight   (r, in)    = a.T
    unet.<module>.lora_B.weight   (out, r)   = (alpha / r) * b.T

with `<module>` the Diffusers module name (`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`,
`...ff.net.0.proj`). The alpha / r scale is folded into lora_B, so the file means
W + lora_B @ lora_A under any loader: Diffusers takes alpha == r (scale 1) when a file carries
no alphas. Reading a file back gives adapters with a `LoraConfig` of alpha == rank.
"""

from __future__ import annotations

import os
import re
from typing import Any, Dict, Mapping, Tuple, Union

import flax
import numpy as np
from safetensors.numpy import load_file, save_file

from tdm_jax import lora
from tdm_jax.files import atomic_write
from tdm_jax.convert.unet import diffusers_name, our_path, expected_param_shapes
from tdm_jax.models.unet import UNetConfig

WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # What `load_lora_weights(folder)` looks for.


class LoraConversionError(ValueError):
  """Adapters or a LoRA file do not fit the configured UNet; the message names the offenders."""


def _check_kernels(paths, shapes, config) -> Dict[Tuple[str, ...], Tuple[int, ...]]:
  expected = expected_param_shapes(config)
  problems = []
  for path, shape in zip(paths, shapes):
    name = "/".join(path)
    if path not in expected:
      problems.append(f"{name}: no such parameter in the UNet")
    elif len(expected[path]) != 2 or path[-1] != "kernel":
      problems.append(f"{name}: not a Dense kernel (shape {expected[path]})")
    elif tuple(shape) != expected[path]:
      problems.append(f"{name}: a @ b has shape {tuple(shape)}, the kernel {expected[path]}")
  if problems:
    raise LoraConversionError("LoRA adapters do not fit the UNet config:\n  " + "\n  ".join(problems))
  return expected


def lora_state_dict_from_adapters(adapters, lora_cfg: lora.LoraConfig,
                                  unet_config: Union[UNetConfig, Mapping[str, Any]],
                                  prefix: str = "unet", dtype=np.float32) -> Dict[str, np.ndarray]:
  """Adapters -> {"unet.<module>.lora_A.weight": (r, in), "unet.<module>.lora_B.weight": (out, r)}."""
  items = lora.adapter_items(adapters)
  _check_kernels(list(items), [(np.shape(a)[0], np.shape(b)[1]) for a, b in items.values()], unet_config)
  out = {}
  for path, (a, b) in items.items():
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    if a.shape[1] != b.shape[0]:
      raise LoraConversionError(f"{'/'.join(path)}: a {a.shape} and b {b.shape} disagree on the rank")
    module = (prefix + "." if prefix else "") + diffusers_name(path[:-1])
    out[f"{module}.lora_A.weight"] = np.ascontiguousarray(a.T).astype(dtype)
    out[f"{module}.lora_B.weight"] = np.ascontiguousarray(lora_cfg.scale * b.T).astype(dtype)
  return out


def save_lora(path: str, adapters, lora_cfg: lora.LoraConfig,
              unet_config: Union[UNetConfig, Mapping[str, Any]], dtype=np.float32) -> str:
  """Writes the adapters as a Diffusers-loadable LoRA safetensors file, atomically; returns its path.

  `path` is a `.safetensors` file, or a folder that receives `pytorch_lora_weights.safetensors`.
  Load with `pipeline.load_lora_weights(path)` or `unet.load_lora_adapter(path, prefix="unet")`.
  """
  tensors = lora_state_dict_from_adapters(adapters, lora_cfg, unet_config, dtype=dtype)
  path = os.fspath(path)
  if not path.endswith(".safetensors"):
    path = os.path.join(path, WEIGHT_NAME)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
  return path


def load_lora(path: str, unet_config: Union[UNetConfig, Mapping[str, Any]],
              prefix: str = "unet") -> Tuple[Dict[str, Any], lora.LoraConfig]:
  """A file in the layout above -> (adapters, LoraConfig(rank, alpha=rank, targets=its kernels))."""
  path = os.fspath(path)
  if os.path.isdir(path):
    path = os.path.join(path, WEIGHT_NAME)
  tensors = load_file(path)
  start = prefix + "." if prefix else ""
  pairs: Dict[str, Dict[str, np.ndarray]] = {}
  unused = []
  for key, value in tensors.items():
    for part, leaf in ((".lora_A.weight", "a"), (".lora_B.weight", "b")):
      if key.startswith(start) and key.endswith(part):
        pairs.setdefault(key[len(start):-len(part)], {})[leaf] = value
        break
    else:
      unused.append(key)
  broken = sorted(m for m, ab in pairs.items() if set(ab) != {"a", "b"})
  if unused or broken or not pairs:
    raise LoraConversionError(
        f"{path} is not a LoRA file of this layout (prefix {prefix!r}):"
        + (f"\n  unrecognised keys: {sorted(unused)[:8]}" if unused else "")
        + (f"\n  modules without both lora_A and lora_B: {broken[:8]}" if broken else "")
        + ("\n  no LoRA tensors" if not pairs else ""))
  ranks = {ab["a"].shape[0] for ab in pairs.values()}
  if len(ranks) != 1:
    raise LoraConversionError(f"{path}: mixed ranks {sorted(ranks)} are not supported")
  flat = {}
  for module, ab in sorted(pairs.items()):
    kernel = our_path(module) + ("kernel",)
    flat[kernel] = {"a": np.asarray(ab["a"], np.float32).T, "b": np.asarray(ab["b"], np.float32).T}
  _check_kernels(list(flat), [(v["a"].shape[0], v["b"].shape[1]) for v in flat.values()], unet_config)
  rank = ranks.pop()
  targets = tuple("^" + re.escape("/".join(p)) + "$" for p in flat)
  adapters = flax.traverse_util.unflatten_dict(
      {p + (leaf,): v[leaf] for p, v in flat.items() for leaf in ("a", "b")})
  return adapters, lora.LoraConfig(rank=rank, alpha=float(rank), targets=targets)
