"""The UNet's kohya / SGM ("LDM") LoRA layout, the one ComfyUI and A1111 load and SDXL-Lightning and
Hyper-SD ship: our UNet's LoRA adapters <-> a kohya LoRA safetensors file.

Module names are those of the original Stability (LDM / SGM) UNet, "." -> "_", after `lora_unet_`:

    lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight   (r, in)    = a.T
    lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight     (out, r)   = b.T
    lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.alpha              ()         = alpha

which every loader applies as W + (alpha / r) * up @ down. UNets only: the transformer families ship
Diffusers (PEFT) LoRA files alone (`convert/lora.py`, with each family's `LORA_LAYOUT`).
"""

from __future__ import annotations

import re
from typing import Any, Dict, Mapping, Tuple, Union

import numpy as np

from tdm_jax.convert import lora as lora_io
from tdm_jax.convert.lora import LoraConversionError
from tdm_jax.convert.unet import LORA_LAYOUT, diffusers_name, expected_param_shapes
from tdm_jax.core import lora
from tdm_jax.models.unet import UNetConfig

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
  for kernel, (a, b) in lora_io.adapter_pairs(adapters, expected, LORA_LAYOUT.model).items():
    if a.shape[1] != lora_cfg.rank:
      raise LoraConversionError(f"{'/'.join(kernel)}: rank {a.shape[1]} but lora_cfg.rank is {lora_cfg.rank}; "
                                f"the file's alpha / r would rescale it. Pass the adapters' own LoraConfig.")
    module = _kohya_module(sgm_name(diffusers_name(kernel[:-1]), blocks))
    tensors[f"{module}.lora_down.weight"] = np.ascontiguousarray(a.T).astype(dtype)
    tensors[f"{module}.lora_up.weight"] = np.ascontiguousarray(b.T).astype(dtype)
    tensors[f"{module}.alpha"] = np.asarray(lora_cfg.alpha, np.float32)
  metadata = {"format": "pt", "ss_network_module": "networks.lora",
              "ss_network_dim": str(lora_cfg.rank), "ss_network_alpha": str(float(lora_cfg.alpha))}
  return lora_io.write_safetensors(path, tensors, metadata)


def load_kohya_lora(path: str, unet_config: Union[UNetConfig, Mapping[str, Any]]
                    ) -> Tuple[Dict[str, Any], lora.LoraConfig]:
  """A kohya LoRA file -> (adapters, LoraConfig(rank, alpha, targets=its kernels)).

  Reads SGM module names (`lora_unet_input_blocks_4_1_...`, SDXL files) and Diffusers ones
  (`lora_unet_down_blocks_1_attentions_0_...`, kohya's SD 1.x files). A module without `.alpha` has
  alpha = r; if the alphas differ, each alpha / r is folded into b and the config has alpha = rank.
  Only linear layers: conv LoRAs (LoCon), LoHa / LoKr / DoRA tensors and text-encoder LoRAs are
  refused by name, as is a module this UNet does not have.
  """
  path, tensors = lora_io.read_safetensors(path)
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
  lora_io.check_kernels(list(flat), [(v["a"].shape[0], v["b"].shape[1]) for v in flat.values()], expected,
                        LORA_LAYOUT.model)
  rank = next(iter(ranks.values()))
  alpha = alphas[next(iter(alphas))] if len(set(alphas.values())) == 1 else float(rank)
  for p, v in flat.items():
    v["b"] = v["b"] * np.float32(alphas[p] / alpha)
  return lora_io.adapters_and_config(flat, rank, alpha)
