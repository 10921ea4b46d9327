"""The Diffusers (PEFT) LoRA file format: our denoiser's LoRA adapters <-> a safetensors file that
Diffusers loads.

The file is in the PEFT layout Diffusers' `load_lora_weights` / `<denoiser>.load_lora_adapter` read
(and write with `save_lora_weights`):

    <prefix>.<module>.lora_A.weight   (r, in)    = a.T
    <prefix>.<module>.lora_B.weight   (out, r)   = (alpha / r) * b.T

with `<module>` the Diffusers module name. What differs between denoiser families is a `LoraLayout`:
the key prefix (the pipeline's component name) and the family's names and shapes. Each family defines
its own beside its converter, and every function here takes it as `layout=`, so that a new family adds
its layout without editing this module:

- `convert/unet.LORA_LAYOUT`: `unet.` + UNet2DConditionModel names
  (`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`, `...ff.net.0.proj`), read by
  SD 1.x / 2.x / SDXL pipelines;
- `convert/mmdit.LORA_LAYOUT`: `transformer.` + SD3Transformer2DModel names such as
  `transformer_blocks.3.attn.add_k_proj`, read by `StableDiffusion3Pipeline`;
- `convert/cogvideox.LORA_LAYOUT`: `transformer.` + CogVideoXTransformer3DModel names.

The alpha / r scale is folded into lora_B, so the file means W + lora_B @ lora_A under any loader:
Diffusers takes alpha == r (scale 1) when a file carries no alphas. Reading a file back gives
adapters with a `LoraConfig` of alpha == rank.

`save_step_lora` writes a unified student's step count K as a LoRA of its own on the layer after
which the family adds its step row (the layout's `step_module`: the UNet's `time_embedding.linear_2`,
the MMDiT's `time_text_embed.timestep_embedder.linear_2`) whose only non-zero tensor is
`lora_B.bias` (see there).

The helpers `adapter_pairs`, `check_kernels`, `adapters_and_config`, `write_safetensors` and
`read_safetensors` are shared with other LoRA file formats (`convert/kohya.py`, the UNet's
ComfyUI / A1111 layout).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import flax
import numpy as np
from safetensors.numpy import load_file, save_file

from tdm_jax.core import lora
from tdm_jax.infra.errors import ConfigError
from tdm_jax.infra.files import atomic_write

WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # What `load_lora_weights(folder)` looks for.

Path = Tuple[str, ...]


class LoraConversionError(ConfigError):
  """Adapters or a LoRA file do not fit the configured denoiser; the message names the offenders."""


@dataclasses.dataclass(frozen=True)
class LoraLayout:
  """How one denoiser family's adapters are named in a Diffusers (PEFT) LoRA file.

  prefix: the pipeline's component name, which starts every key ("unet", "transformer").
  model: the denoiser's name in messages.
  expected_param_shapes(config) -> {our parameter path: shape}, config a family config or its dict.
  diffusers_name(module path) -> the Diffusers module name of one of our layers, its kernel's path
    without "kernel" (`("transformer_blocks_0", "attn", "to_out_0")` -> "transformer_blocks.0.attn.to_out.0").
  our_path(module name) -> our module path (the inverse).
  step_module: our module path of the Dense layer whose output a unified student's step row is added to.
  """
  prefix: str
  model: str
  expected_param_shapes: Callable[[Any], Mapping[Path, Tuple[int, ...]]]
  diffusers_name: Callable[[Path], str]
  our_path: Callable[[str], Path]
  step_module: Path

  def key(self, module: Path, prefix: Optional[str] = None) -> str:
    """`<prefix>.<Diffusers module name>`, the stem of a module's keys (prefix None: the layout's own)."""
    prefix = self.prefix if prefix is None else prefix
    return (prefix + "." if prefix else "") + self.diffusers_name(module)


ConfigLike = Any  # a family's config object (UNetConfig, MMDiTConfig) or its config.json dict


def check_kernels(paths, shapes, expected: Mapping[Path, Tuple[int, ...]], model: str) -> None:
  """Refuses (naming each) kernel paths that are no 2-D kernel of the model or whose a @ b shape differs."""
  problems = []
  for path, shape in zip(paths, shapes):
    name = "/".join(path)
    if path not in expected:
      problems.append(f"{name}: no such parameter in the {model}")
    elif len(expected[path]) != 2 or path[-1] != "kernel":
      problems.append(f"{name}: not a Dense kernel (shape {expected[path]})")
    elif tuple(shape) != expected[path]:
      problems.append(f"{name}: a @ b has shape {tuple(shape)}, the kernel {expected[path]}")
  if problems:
    raise LoraConversionError(f"LoRA adapters do not fit the {model} config:\n  " + "\n  ".join(problems))


def adapter_pairs(adapters, expected, model: str) -> Dict[Path, Tuple[np.ndarray, np.ndarray]]:
  """{kernel path: (a, b)} as float32 numpy, checked against the denoiser's kernels. Parameters trained
  in full are refused: a LoRA file has no slot for them, and dropping them silently would lose them."""
  full = lora.split_full(adapters)[1]
  if full:
    raise LoraConversionError(
        f"the adapters hold parameters trained in full ({sorted('/'.join(p) for p in full)}), which a LoRA "
        f"file cannot carry: write lora.split_full(adapters)[0], and a unified student's step table with "
        f"save_step_lora (tdm_jax.tasks.diffusers.task.export does both)")
  items = lora.adapter_items(adapters)
  check_kernels(list(items), [(np.shape(a)[0], np.shape(b)[1]) for a, b in items.values()], expected, model)
  out = {}
  for path, (a, b) in items.items():
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    if a.shape[1] != b.shape[0]:
      raise LoraConversionError(f"{'/'.join(path)}: a {a.shape} and b {b.shape} disagree on the rank")
    out[path] = (a, b)
  return out


def write_safetensors(path, tensors: Dict[str, np.ndarray], metadata: Dict[str, str]) -> str:
  """Writes `path` (a `.safetensors` file, or a folder that receives `WEIGHT_NAME`) atomically."""
  path = os.fspath(path)
  if not path.endswith(".safetensors"):
    path = os.path.join(path, WEIGHT_NAME)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
  return path


def read_safetensors(path) -> Tuple[str, Dict[str, np.ndarray]]:
  """(the file's path, its tensors as numpy) of `path` (a `.safetensors` file, or a folder holding `WEIGHT_NAME`)."""
  path = os.fspath(path)
  if os.path.isdir(path):
    path = os.path.join(path, WEIGHT_NAME)
  try:
    return path, load_file(path)
  except TypeError:  # bfloat16 (common in kohya files), which the numpy reader refuses: read through JAX.
    from safetensors.flax import load_file as load_jax_file  # pylint: disable=g-import-not-at-top
    return path, {k: np.asarray(v, np.float32) for k, v in load_jax_file(path).items()}


def adapters_and_config(flat, rank: int, alpha: float):
  """{kernel path: {"a", "b"}} -> (adapter tree, LoraConfig targeting exactly those kernels)."""
  targets = tuple("^" + re.escape("/".join(p)) + "$" for p in sorted(flat))
  adapters = flax.traverse_util.unflatten_dict(
      {p + (leaf,): v[leaf] for p, v in flat.items() for leaf in ("a", "b")})
  return adapters, lora.LoraConfig(rank=rank, alpha=float(alpha), targets=targets)


def lora_state_dict_from_adapters(adapters, lora_cfg: lora.LoraConfig, config: ConfigLike,
                                  prefix: Optional[str] = None, dtype=np.float32, *,
                                  layout: LoraLayout) -> Dict[str, np.ndarray]:
  """Adapters -> {"<prefix>.<module>.lora_A.weight": (r, in), "<prefix>.<module>.lora_B.weight": (out, r)}.

  `config` is the denoiser's (a family config or its config.json dict); prefix None: the layout's.
  """
  out = {}
  for path, (a, b) in adapter_pairs(adapters, layout.expected_param_shapes(config), layout.model).items():
    module = layout.key(path[:-1], prefix)
    out[f"{module}.lora_A.weight"] = np.ascontiguousarray(a.T).astype(dtype)
    out[f"{module}.lora_B.weight"] = np.ascontiguousarray(lora_cfg.scale * b.T).astype(dtype)
  return out


def save_lora(path: str, adapters, lora_cfg: lora.LoraConfig, config: ConfigLike, dtype=np.float32, *,
              layout: LoraLayout) -> str:
  """Writes the adapters as a Diffusers-loadable LoRA safetensors file, atomically; returns its path.

  `path` is a `.safetensors` file, or a folder that receives `pytorch_lora_weights.safetensors`.
  `layout` is the family's (convert/unet.LORA_LAYOUT, convert/mmdit.LORA_LAYOUT, ...). Load with
  `pipeline.load_lora_weights(path)`, or `<denoiser>.load_lora_adapter(path, prefix=layout.prefix)`
  (`unet.load_lora_adapter(path, prefix="unet")`, `transformer.load_lora_adapter(path, prefix="transformer")`).
  """
  tensors = lora_state_dict_from_adapters(adapters, lora_cfg, config, dtype=dtype, layout=layout)
  return write_safetensors(path, tensors, {"format": "pt"})


def save_step_lora(path: str, row, config: ConfigLike, prefix: Optional[str] = None, dtype=np.float32, *,
                   layout: LoraLayout) -> str:
  """Row K of a unified student's step table as a Diffusers LoRA file, atomically; returns its path.

  Stock pipelines pass no step count, so the row travels as the `lora_B.bias` of a rank-1 adapter
  with all-zero matrices on the layout's `step_module` (the UNet's time_embedding.linear_2, where
  Diffusers adds the class embedding; the MMDiT's time_text_embed.timestep_embedder.linear_2, where
  our model adds its step row): PEFT adds (alpha / r) * bias = the row (a file without alphas has
  alpha = r) to that layer's output, so the sum is exact. Loaded beside the adapters as an adapter
  of its own, one per K: `pipe.load_lora_weights(path, adapter_name="tdm_4step")`, then
  `pipe.set_adapters(["tdm", "tdm_4step"])`. Exact at adapter weight 1 only: a LoRA strength s
  (`set_adapters` weights, `cross_attention_kwargs={"scale": s}`, `fuse_lora(lora_scale=s)`) scales the
  row too; to soften the student, give s to the shared adapters alone: `set_adapters(["tdm",
  "tdm_4step"], [s, 1.0])`.
  """
  kernel = layout.expected_param_shapes(config)[layout.step_module + ("kernel",)]
  row = np.asarray(row, np.float32)
  if row.shape != (kernel[1],):
    raise LoraConversionError(f"a step-table row of shape {row.shape} does not fit "
                              f"{layout.diffusers_name(layout.step_module)}, whose output has {kernel[1]} features")
  module = layout.key(layout.step_module, prefix)
  tensors = {f"{module}.lora_A.weight": np.zeros((1, kernel[0]), dtype),
             f"{module}.lora_B.weight": np.zeros((kernel[1], 1), dtype),
             f"{module}.lora_B.bias": row.astype(dtype)}
  return write_safetensors(path, tensors, {"format": "pt"})


def load_lora(path: str, config: ConfigLike, prefix: Optional[str] = None, *,
              layout: LoraLayout) -> Tuple[Dict[str, Any], lora.LoraConfig]:
  """A file in the layout above -> (adapters, LoraConfig(rank, alpha=rank, targets=its kernels)).

  prefix None: the layout's. A step file (`save_step_lora`, with its `lora_B.bias`) is refused.
  """
  path, tensors = read_safetensors(path)
  prefix = layout.prefix if prefix is None else prefix
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
    kernel = layout.our_path(module) + ("kernel",)
    flat[kernel] = {"a": np.asarray(ab["a"], np.float32).T, "b": np.asarray(ab["b"], np.float32).T}
  check_kernels(list(flat), [(v["a"].shape[0], v["b"].shape[1]) for v in flat.values()],
                 layout.expected_param_shapes(config), layout.model)
  rank = ranks.pop()
  return adapters_and_config(flat, rank, rank)
