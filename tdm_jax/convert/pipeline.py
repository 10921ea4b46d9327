"""Whole pipeline folders as files: converted Flax trees kept as an orbax checkpoint beside the
pipeline's small files, and whole pipeline folders written back for Diffusers to load.

Which component is which kind of model (and so which converter reads or writes it) is the caller's
knowledge (`tasks/diffusers/description.py`); this module only moves files and trees.

The converted checkpoint sits beside a copy of the pipeline's small files (model_index.json,
configs, tokenizers, scheduler), so later runs need neither the original folder nor a second
conversion, and restore the trees directly, sharded as the run asks.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp

from tdm_jax.convert import folders
from tdm_jax.infra.checkpoint import Checkpointer
from tdm_jax.infra.errors import MissingFileError

PyTree = Any
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".index.json")
CONVERTED_STEP = 0


def _copy_small_files(folder: str, out: str) -> None:
  """Everything but the weights: model_index.json, configs, tokenizers, scheduler."""
  for root, _, files in os.walk(folder):
    rel = os.path.relpath(root, folder)
    for filename in files:
      if filename.endswith(WEIGHT_SUFFIXES):
        continue
      os.makedirs(os.path.join(out, rel), exist_ok=True)
      shutil.copy2(os.path.join(root, filename), os.path.join(out, rel, filename))


def save_converted(folder: str, out_dir: str, params: dict) -> dict:
  """Writes converted `params` ({component: tree}) of `folder` into `out_dir` (an orbax checkpoint,
  plus `pipeline/`: the folder's small files).

  Atomic: the pipeline files are written to a temporary folder and renamed, and orbax commits its
  checkpoint by rename, so an interrupted conversion leaves nothing that looks complete.
  """
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


def export_pipeline(pipeline_files: str, trees: dict, out_dir: str, write_component: Callable, *,
                    components: Sequence[str], configs=None, shared_from: Optional[str] = None) -> str:
  """A whole pipeline folder from the small files of `pipeline_files` and our trees per component.

  `trees` maps model components (`components`: the pipeline's, e.g. unet, text_encoder, vae) to
  parameter trees; pass the distilled student under its denoiser's name. `write_component(name,
  params, config, folder)` writes one (`PipelineDescription.write_component`). `configs` replaces
  components' configs (e.g. the student's; "scheduler" also names its class in model_index.json).
  `shared_from`: an exported pipeline whose other model components this one links to instead of
  writing them again (GBs at SDXL's size). Written to a temporary folder and renamed when complete.
  """
  configs = dict(configs or {})
  missing = [name for name in components if name not in trees]
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
      write_component(name, params, config, os.path.join(staging, name))
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
