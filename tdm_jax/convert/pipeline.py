"""Whole pipeline folders: Diffusers folder -> converted Flax trees (an orbax checkpoint), and a
distilled UNet -> a Diffusers `unet/` folder (or a whole pipeline folder) that Diffusers loads.

The converted checkpoint sits beside a copy of the pipeline's small files (model_index.json,
configs, tokenizers, scheduler), so later runs need neither the original folder nor a second
conversion, and restore the trees directly, sharded as the run asks.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from tdm_jax.convert import folders
from tdm_jax.convert.clip import clip_params_from_state_dict, clip_state_dict_from_params
from tdm_jax.convert.unet import unet_params_from_state_dict, unet_state_dict_from_params
from tdm_jax.convert.vae import vae_params_from_state_dict, vae_state_dict_from_params
from tdm_jax.infra.checkpoint import Checkpointer
from tdm_jax.infra.errors import MissingFileError
from tdm_jax.models.clip import ClipConfig

PyTree = Any
MODEL_COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "vae")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".index.json")
CONVERTED_STEP = 0


def present_components(folder: str) -> list:
  """The model components model_index.json lists (and that are not null), in a fixed order."""
  index = folders.read_model_index(folder)
  return [name for name in MODEL_COMPONENTS
          if name in index and isinstance(index[name], (list, tuple)) and index[name][0] is not None]


def convert_component(folder: str, name: str, *, variant: Optional[str] = None, allow_pickle: bool = False):
  """One component's weights as our parameter tree (numpy leaves), checked name by name."""
  path = folders.component_path(folder, name)
  config = folders.read_config(path)
  state = folders.load_state_dict(path, variant=variant, allow_pickle=allow_pickle)
  if name == "unet":
    return unet_params_from_state_dict(state, config)
  if name == "vae":
    return vae_params_from_state_dict(state, config)
  return clip_params_from_state_dict(state, ClipConfig.from_dict(config))


def convert_pipeline(folder: str, *, variant: Optional[str] = None, allow_pickle: bool = False) -> dict:
  """{component: params} for every model component of a pipeline folder."""
  return {name: convert_component(folder, name, variant=variant, allow_pickle=allow_pickle)
          for name in present_components(folder)}


def _copy_small_files(folder: str, out: str) -> None:
  """Everything but the weights: model_index.json, configs, tokenizers, scheduler."""
  for root, _, files in os.walk(folder):
    rel = os.path.relpath(root, folder)
    for filename in files:
      if filename.endswith(WEIGHT_SUFFIXES):
        continue
      os.makedirs(os.path.join(out, rel), exist_ok=True)
      shutil.copy2(os.path.join(root, filename), os.path.join(out, rel, filename))


def save_converted(folder: str, out_dir: str, *, variant: Optional[str] = None, allow_pickle: bool = False) -> dict:
  """Converts `folder` into `out_dir` (params as an orbax checkpoint, plus `pipeline/` small files).

  Atomic: the pipeline files are written to a temporary folder and renamed, and orbax commits its
  checkpoint by rename, so an interrupted conversion leaves nothing that looks complete.
  """
  params = convert_pipeline(folder, variant=variant, allow_pickle=allow_pickle)
  os.makedirs(out_dir, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=".pipeline-", dir=out_dir)
  _copy_small_files(folder, staging)
  final = os.path.join(out_dir, "pipeline")
  if os.path.exists(final):
    shutil.rmtree(final)
  os.replace(staging, final)
  checkpointer = Checkpointer(os.path.join(out_dir, "params"), process_local=True)  # host trees, one writer
  try:
    checkpointer.save(CONVERTED_STEP, params)
  finally:
    checkpointer.close()
  return params


def is_converted(out_dir: str) -> bool:
  return os.path.isfile(os.path.join(out_dir, "pipeline", folders.MODEL_INDEX)) and os.path.isdir(
      os.path.join(out_dir, "params", str(CONVERTED_STEP)))


def load_converted(out_dir: str, sharding=None, dtype=None) -> dict:
  """The trees `save_converted` wrote, placed by `sharding` (one sharding, or (path, shape) -> sharding;
  None: the default device). `dtype`: floating-point leaves are read as it (orbax casts while
  reading, so a bf16 teacher never exists as a float32 tree first)."""
  checkpointer = Checkpointer(os.path.join(out_dir, "params"), process_local=sharding is None)
  try:
    if CONVERTED_STEP not in checkpointer.all_steps:
      raise MissingFileError(f"no converted checkpoint in {out_dir}/params; run --mode=convert first")
    abstract = checkpointer.stored_structure(CONVERTED_STEP, sharding)
    if dtype is not None:
      abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, dtype, sharding=a.sharding)
                              if jnp.issubdtype(a.dtype, jnp.floating) else a, abstract)
    return checkpointer.restore(CONVERTED_STEP, abstract)
  finally:
    checkpointer.close()


def export_component(name: str, params: PyTree, config: dict, out_dir: str, *, dtype=np.float32) -> str:
  """Writes one component's Diffusers/Transformers folder (config.json + safetensors) from our tree."""
  params = jax.device_get(params)
  weights_name = "diffusion_pytorch_model.safetensors"
  if name == "unet":
    state = unet_state_dict_from_params(params, config)
  elif name == "vae":
    state = vae_state_dict_from_params(params, config)
  else:
    state = clip_state_dict_from_params(params, ClipConfig.from_dict(config))
    weights_name = "model.safetensors"
  state = {k: np.asarray(v, dtype) for k, v in state.items()}
  folders.save_state_dict(out_dir, state, config, weights_name=weights_name)
  return out_dir


def export_unet(params: PyTree, unet_config: dict, out_dir: str, *, dtype=np.float32) -> str:
  """A Diffusers `unet/` folder for our UNet tree: `UNet2DConditionModel.from_pretrained` loads it."""
  return export_component("unet", params, unet_config, out_dir, dtype=dtype)


def export_pipeline(pipeline_files: str, trees: dict, out_dir: str, *, dtype=np.float32, configs=None,
                    shared_from: Optional[str] = None) -> str:
  """A whole pipeline folder from the small files of `pipeline_files` and our trees per component.

  `trees` maps component names (unet, text_encoder, text_encoder_2, vae) to parameter trees; pass
  the distilled student as "unet". `configs` replaces components' configs (e.g. the student's UNet;
  "scheduler" also names its class in model_index.json). `shared_from`: an exported pipeline whose
  other model components this one links to instead of writing them again (GBs at SDXL's size).
  Written to a temporary folder and renamed when complete.
  """
  configs = dict(configs or {})
  missing = [name for name in present_components(pipeline_files) if name not in trees]
  if missing and shared_from is None:
    raise ValueError(f"no parameters given for the pipeline components {missing}")
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=".export-", dir=parent)
  os.chmod(staging, 0o755)  # mkdtemp's 0700 would hide the folder from the other users of a shared workdir
  try:
    _copy_small_files(pipeline_files, staging)
    for name in missing:
      shutil.rmtree(os.path.join(staging, name))
      os.symlink(os.path.relpath(os.path.join(shared_from, name), os.path.abspath(out_dir)),
                 os.path.join(staging, name))
    for name, params in trees.items():
      config = configs.get(name) or folders.read_config(folders.component_path(pipeline_files, name))
      export_component(name, params, config, os.path.join(staging, name), dtype=dtype)
    if "scheduler" in configs:
      folders.write_json(os.path.join(staging, "scheduler", "scheduler_config.json"), configs["scheduler"])
      index = folders.read_model_index(staging)
      index["scheduler"] = [index.get("scheduler", ["diffusers"])[0], configs["scheduler"]["_class_name"]]
      folders.write_json(os.path.join(staging, folders.MODEL_INDEX), index)
    if os.path.exists(out_dir):
      shutil.rmtree(out_dir)
    os.replace(staging, out_dir)
  finally:
    if os.path.exists(staging):
      shutil.rmtree(staging)
  return out_dir
