"""Our denoiser's LoRA adapters <-> a safetensors LoRA file that Diffusers loads.

The file is in the PEFT layout Diffusers' `load_lora_weights` / `<denoiser>.load_lora_adapter` read
(and write with `save_lora_weights`):

    <prefix>.<module>.lora_A.weight   (r, in)    = a.T
    <prefix>.<module>.lora_B.weight   (out, r)   = (alpha / r) * b.T

with `<module>` the Diffusers module name. What differs between denoiser families is a `LoraLayout`:
the key prefix (the pipeline's component name) and the family's names and shapes.

- `UNET` (the default of every function here): `unet.` + UNet2DConditionModel names
  (`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`, `...ff.net.0.proj`), read by
  SD 1.x / 2.x / SDXL pipelines.
- a transformer family's own, beside its converter (`convert/mmdit.LORA_LAYOUT`: `transformer.` +
  SD3Transformer2DModel names such as `transformer_blocks.3.attn.add_k_proj`, read by
  `StableDiffusion3Pipeline`), so that a new family adds its layout without editing this module.

The alpha / r scale is folded into lora_B, so the file means W + lora_B @ lora_A under any loader:
Diffusers takes alpha == r (scale 1) when a file carries no alphas. Reading a file back gives
adapters with a `LoraConfig` of alpha == rank.

`save_step_lora` writes a unified student's step count K as a LoRA of its own on the layer after
which the family adds its step row (the layout's `step_module`: the UNet's `time_embedding.linear_2`,
the MMDiT's `time_text_embed.timestep_embedder.linear_2`) whose only non-zero tensor is
`lora_B.bias` (see there).

`save_kohya_lora` / `load_kohya_lora` (UNets only) handle the kohya / SGM layout that ComfyUI and A1111
load and that SDXL-Lightning and Hyper-SD ship: module names of the original Stability (LDM) UNet,
"." -> "_",

    lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight   (r, in)    = a.T
    lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight     (out, r)   = b.T
    lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.alpha              ()         = alpha

which every loader applies as W + (alpha / r) * up @ down.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import flax
import numpy as np
from safetensors.numpy import load_file, save_file

from tdm_jax.convert import unet as unet_io
from tdm_jax.convert.unet import diffusers_name, our_path, expected_param_shapes
from tdm_jax.core import lora
from tdm_jax.infra.errors import ConfigError
from tdm_jax.infra.files import atomic_write
from tdm_jax.models.unet import UNetConfig

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


UNET = LoraLayout(prefix="unet", model="UNet", expected_param_shapes=unet_io.expected_param_shapes,
                  diffusers_name=unet_io.diffusers_name, our_path=unet_io.our_path,
                  step_module=("time_embedding", "linear_2"))  # where Diffusers adds the class embedding
ConfigLike = Any  # a family's config object (UNetConfig, MMDiTConfig) or its config.json dict


def _check_kernels(paths, shapes, expected: Mapping[Path, Tuple[int, ...]], model: str = "UNet") -> None:
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


def _adapter_pairs(adapters, expected, model: str = "UNet") -> Dict[Path, Tuple[np.ndarray, np.ndarray]]:
  """{kernel path: (a, b)} as float32 numpy, checked against the denoiser's kernels. Parameters trained
  in full are refused: a LoRA file has no slot for them, and dropping them silently would lose them."""
  full = lora.split_full(adapters)[1]
  if full:
    raise LoraConversionError(
        f"the adapters hold parameters trained in full ({sorted('/'.join(p) for p in full)}), which a LoRA "
        f"file cannot carry: write lora.split_full(adapters)[0], and a unified student's step table with "
        f"save_step_lora (tdm_jax.tasks.diffusers.task.export does both)")
  items = lora.adapter_items(adapters)
  _check_kernels(list(items), [(np.shape(a)[0], np.shape(b)[1]) for a, b in items.values()], expected, model)
  out = {}
  for path, (a, b) in items.items():
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    if a.shape[1] != b.shape[0]:
      raise LoraConversionError(f"{'/'.join(path)}: a {a.shape} and b {b.shape} disagree on the rank")
    out[path] = (a, b)
  return out


def _write(path, tensors: Dict[str, np.ndarray], metadata: Dict[str, str]) -> str:
  """Writes `path` (a `.safetensors` file, or a folder that receives `WEIGHT_NAME`) atomically."""
  path = os.fspath(path)
  if not path.endswith(".safetensors"):
    path = os.path.join(path, WEIGHT_NAME)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
  return path


def _read(path) -> Tuple[str, Dict[str, np.ndarray]]:
  path = os.fspath(path)
  if os.path.isdir(path):
    path = os.path.join(path, WEIGHT_NAME)
  try:
    return path, load_file(path)
  except TypeError:  # bfloat16 (common in kohya files), which the numpy reader refuses: read through JAX.
    from safetensors.flax import load_file as load_jax_file  # pylint: disable=g-import-not-at-top
    return path, {k: np.asarray(v, np.float32) for k, v in load_jax_file(path).items()}


def _adapters_and_config(flat, rank: int, alpha: float):
  """{kernel path: {"a", "b"}} -> (adapter tree, LoraConfig targeting exactly those kernels)."""
  targets = tuple("^" + re.escape("/".join(p)) + "$" for p in sorted(flat))
  adapters = flax.traverse_util.unflatten_dict(
      {p + (leaf,): v[leaf] for p, v in flat.items() for leaf in ("a", "b")})
  return adapters, lora.LoraConfig(rank=rank, alpha=float(alpha), targets=targets)


def lora_state_dict_from_adapters(adapters, lora_cfg: lora.LoraConfig, config: ConfigLike,
                                  prefix: Optional[str] = None, dtype=np.float32,
                                  layout: LoraLayout = UNET) -> Dict[str, np.ndarray]:
  """Adapters -> {"<prefix>.<module>.lora_A.weight": (r, in), "<prefix>.<module>.lora_B.weight": (out, r)}.

  `config` is the denoiser's (a family config or its config.json dict); prefix None: the layout's.
  """
  out = {}
  for path, (a, b) in _adapter_pairs(adapters, layout.expected_param_shapes(config), layout.model).items():
    module = layout.key(path[:-1], prefix)
    out[f"{module}.lora_A.weight"] = np.ascontiguousarray(a.T).astype(dtype)
    out[f"{module}.lora_B.weight"] = np.ascontiguousarray(lora_cfg.scale * b.T).astype(dtype)
  return out


def save_lora(path: str, adapters, lora_cfg: lora.LoraConfig, config: ConfigLike, dtype=np.float32,
              layout: LoraLayout = UNET) -> str:
  """Writes the adapters as a Diffusers-loadable LoRA safetensors file, atomically; returns its path.

  `path` is a `.safetensors` file, or a folder that receives `pytorch_lora_weights.safetensors`.
  Load with `pipeline.load_lora_weights(path)`, or `unet.load_lora_adapter(path, prefix="unet")`
  (`transformer.load_lora_adapter(path, prefix="transformer")` with its family's layout, e.g. convert/mmdit.LORA_LAYOUT).
  """
  tensors = lora_state_dict_from_adapters(adapters, lora_cfg, config, dtype=dtype, layout=layout)
  return _write(path, tensors, {"format": "pt"})


STEP_MODULE = UNET.step_module  # the UNet's; a family's is its layout's `step_module`


def save_step_lora(path: str, row, config: ConfigLike, prefix: Optional[str] = None, dtype=np.float32,
                   layout: LoraLayout = UNET) -> str:
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
  return _write(path, tensors, {"format": "pt"})


def load_lora(path: str, config: ConfigLike, prefix: Optional[str] = None,
              layout: LoraLayout = UNET) -> Tuple[Dict[str, Any], lora.LoraConfig]:
  """A file in the layout above -> (adapters, LoraConfig(rank, alpha=rank, targets=its kernels)).

  prefix None: the layout's. A step file (`save_step_lora`, with its `lora_B.bias`) is refused.
  """
  path, tensors = _read(path)
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
  _check_kernels(list(flat), [(v["a"].shape[0], v["b"].shape[1]) for v in flat.values()],
                 layout.expected_param_shapes(config), layout.model)
  rank = ranks.pop()
  return _adapters_and_config(flat, rank, rank)


# --- kohya / SGM ("LDM") layout ------------------------------------------------------------------

KOHYA_PREFIX = "lora_unet_"

# Diffusers -> SGM names of the modules outside the down/mid/up blocks.
_SGM_OUTER = {
    "conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
# Diffusers -> SGM names inside a resnet (transformer and attention inner names are the same in both).
_SGM_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_BLOCK = re.compile(r"^((?:down_blocks|up_blocks)\.\d+\.[a-z]+\.\d+|mid_block\.[a-z]+\.\d+)\.(.+)$")


def sgm_blocks(unet_config: Union[UNetConfig, Mapping[str, Any]]) -> Dict[str, str]:
  """Diffusers block -> SGM block, e.g. SDXL's 'down_blocks.1.attentions.0' -> 'input_blocks.4.1'.

  SGM numbers the UNet's layers in order: input_blocks.0 is conv_in, then each down block's layers
  (resnet .0 with its attention .1), then its downsampler (.0); middle_block.{0, 1, 2} is resnet,
  attention, resnet; each up block has layers_per_block + 1 output_blocks (resnet .0, attention .1),
  the last also holding the upsampler (.1 without attention, .2 with). Entries for attentions of
  blocks without any are unused.
  """
  cfg = unet_config if isinstance(unet_config, UNetConfig) else UNetConfig.from_dict(unet_config)
  layers = cfg.layers_per_block_list
  last = len(layers) - 1
  out = {"mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
         "mid_block.resnets.1": "middle_block.2"}
  n = 1
  for i, count in enumerate(layers):
    for j in range(count):
      out[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{n}.0"
      out[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{n}.1"
      n += 1
    if i < last:
      out[f"down_blocks.{i}.downsamplers.0"] = f"input_blocks.{n}.0"
      n += 1
  n = 0
  for i, count in enumerate(reversed(layers)):
    for j in range(count + 1):
      out[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{n}.0"
      out[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{n}.1"
      n += 1
    if i < last:
      has_attention = cfg.up_block_types[i] == "CrossAttnUpBlock2D"
      out[f"up_blocks.{i}.upsamplers.0"] = f"output_blocks.{n - 1}.{2 if has_attention else 1}"
  return out


def sgm_name(module: str, blocks: Mapping[str, str]) -> str:
  """A Diffusers module name -> its SGM name, with `blocks` from `sgm_blocks`."""
  if module in _SGM_OUTER:
    return _SGM_OUTER[module]
  m = _BLOCK.match(module)
  if not m or m.group(1) not in blocks:
    raise LoraConversionError(f"{module}: no SGM name for this module (not in a block of this UNet config)")
  block, inner = m.groups()
  first, dot, rest = inner.partition(".")
  if ".resnets." in block:
    first = _SGM_RESNET.get(first, first)
  elif ".downsamplers." in block and first == "conv":
    first = "op"
  return f"{blocks[block]}.{first}{dot}{rest}"


def _kohya_module(name: str) -> str:
  return KOHYA_PREFIX + name.replace(".", "_")


def save_kohya_lora(path: str, adapters, lora_cfg: lora.LoraConfig,
                    unet_config: Union[UNetConfig, Mapping[str, Any]], dtype=np.float32) -> str:
  """Writes the adapters as a kohya / SGM LoRA safetensors file, atomically; returns its path.

  For ComfyUI, A1111 and other SGM-based tools (they match `lora_unet_` + the SGM weight name). Diffusers'
  SDXL pipelines map it back with `load_lora_weights(path)`; SD 1.x ones need `load_lora_weights(path,
  unet_config=pipe.unet.config)` and fail on LoRAs in input/output_blocks 10-11 (its remapping finds the
  keys of block 1 by substring), which the default attention targets never have.
  `path` is a `.safetensors` file, or a folder that receives `pytorch_lora_weights.safetensors`.
  """
  expected = expected_param_shapes(unet_config)
  blocks = sgm_blocks(unet_config)
  tensors = {}
  for kernel, (a, b) in _adapter_pairs(adapters, expected).items():
    if a.shape[1] != lora_cfg.rank:
      raise LoraConversionError(f"{'/'.join(kernel)}: rank {a.shape[1]} but lora_cfg.rank is {lora_cfg.rank}; "
                                f"the file's alpha / r would rescale it. Pass the adapters' own LoraConfig.")
    module = _kohya_module(sgm_name(diffusers_name(kernel[:-1]), blocks))
    tensors[f"{module}.lora_down.weight"] = np.ascontiguousarray(a.T).astype(dtype)
    tensors[f"{module}.lora_up.weight"] = np.ascontiguousarray(b.T).astype(dtype)
    tensors[f"{module}.alpha"] = np.asarray(lora_cfg.alpha, np.float32)
  metadata = {"format": "pt", "ss_network_module": "networks.lora",
              "ss_network_dim": str(lora_cfg.rank), "ss_network_alpha": str(float(lora_cfg.alpha))}
  return _write(path, tensors, metadata)


def load_kohya_lora(path: str, unet_config: Union[UNetConfig, Mapping[str, Any]]
                    ) -> Tuple[Dict[str, Any], lora.LoraConfig]:
  """A kohya LoRA file -> (adapters, LoraConfig(rank, alpha, targets=its kernels)).

  Reads SGM module names (`lora_unet_input_blocks_4_1_...`, SDXL files) and Diffusers ones
  (`lora_unet_down_blocks_1_attentions_0_...`, kohya's SD 1.x files). A module without `.alpha` has
  alpha = r; if the alphas differ, each alpha / r is folded into b and the config has alpha = rank.
  Only linear layers: conv LoRAs (LoCon), LoHa / LoKr / DoRA tensors and text-encoder LoRAs are
  refused by name, as is a module this UNet does not have.
  """
  path, tensors = _read(path)
  expected = expected_param_shapes(unet_config)
  blocks = sgm_blocks(unet_config)
  names = {}  # kohya module -> our kernel path, for every kernel, in both spellings.
  for p in expected:
    if p[-1] == "kernel":
      module = diffusers_name(p[:-1])
      names[_kohya_module(sgm_name(module, blocks))] = names[_kohya_module(module)] = p
  groups: Dict[str, Dict[str, np.ndarray]] = {}
  unrecognised = []
  for key, value in tensors.items():
    module, _, leaf = key.partition(".")
    if leaf in ("lora_down.weight", "lora_up.weight", "alpha"):
      groups.setdefault(module, {})[leaf] = value
    else:
      unrecognised.append(key)
  problems = [f"{k}: not a LoRA tensor (kohya LoRA has <module>.lora_down.weight, .lora_up.weight, .alpha)"
              for k in sorted(unrecognised)]
  flat, ranks, alphas = {}, {}, {}
  for module, parts in sorted(groups.items()):
    down, up = parts.get("lora_down.weight"), parts.get("lora_up.weight")
    p = names.get(module)
    if not module.startswith(KOHYA_PREFIX):
      problems.append(f"{module}: not a UNet module (only {KOHYA_PREFIX}* LoRAs are read, not text-encoder ones)")
    elif p is None:
      problems.append(f"{module}: no such layer in this UNet config")
    elif down is None or up is None:
      problems.append(f"{module}: needs both lora_down.weight and lora_up.weight")
    elif down.ndim != 2 or up.ndim != 2 or len(expected[p]) != 2:
      problems.append(f"{module}: a conv LoRA (lora_down {down.shape}); only linear layers are supported")
    else:
      flat[p] = {"a": np.asarray(down, np.float32).T, "b": np.asarray(up, np.float32).T}
      ranks[p] = down.shape[0]
      alphas[p] = float(parts["alpha"]) if "alpha" in parts else float(down.shape[0])
  if problems or not flat:
    raise LoraConversionError(f"{path} is not a kohya LoRA of this UNet (is it for this base model?):\n  "
                              + "\n  ".join(problems[:12] or ["no LoRA tensors"])
                              + (f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else ""))
  if len(set(ranks.values())) != 1:
    example = {}
    for p, r in sorted(ranks.items()):
      example.setdefault(r, "/".join(p))
    raise LoraConversionError(f"{path}: mixed ranks are not supported (one LoraConfig.rank): "
                              + ", ".join(f"rank {r} at {m}" for r, m in sorted(example.items())))
  _check_kernels(list(flat), [(v["a"].shape[0], v["b"].shape[1]) for v in flat.values()], expected)
  rank = next(iter(ranks.values()))
  alpha = alphas[next(iter(alphas))] if len(set(alphas.values())) == 1 else float(rank)
  for p, v in flat.items():
    v["b"] = v["b"] * np.float32(alphas[p] / alpha)
  return _adapters_and_config(flat, rank, alpha)
