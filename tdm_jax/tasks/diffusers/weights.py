"""Where a Diffusers teacher's weights come from: a pipeline folder converted once into
`WORKDIR/converted` (or `teacher.converted`) and restored from there, each tree straight into its
shards on the mesh; or, with no folder at all, random weights made on the mesh from `model.reference`
(published configs, no weights): shape-only runs for benchmarks and dry runs.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from tdm_jax.convert import folders
from tdm_jax.convert import pipeline as pipeline_io
from tdm_jax.core import rng
from tdm_jax.infra import sharding
from tdm_jax.infra.errors import ConfigError
from tdm_jax.tasks.diffusers import prompts
from tdm_jax.tasks.diffusers.description import PipelineDescription, describe

# This file is REPO_ROOT/tdm_jax/tasks/diffusers/weights.py.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def convert_pipeline(folder: str, *, variant: Optional[str] = None, allow_pickle: bool = False,
                     description: Optional[PipelineDescription] = None) -> dict:
  """{component: params (numpy)} for every model component of a pipeline folder, checked name by name."""
  d = description or describe(folder)
  trees = {}
  for name in d.model_components:
    state = folders.load_state_dict(folders.component_path(folder, name), variant=variant, allow_pickle=allow_pickle)
    trees[name] = d.params_from_state_dict(name, state)
    del state
  return trees


def load_prompt_encoder(folder: str, *, variant: Optional[str] = None, allow_pickle: bool = False,
                        image_size: Optional[tuple] = None, dtype="float32") -> prompts.PromptEncoder:
  """The prompt path of a pipeline folder: its tokenizers and text encoders, converted (and nothing else)."""
  d = describe(folder)
  trees = {s.encoder: d.params_from_state_dict(s.encoder, folders.load_state_dict(
      folders.component_path(folder, s.encoder), variant=variant, allow_pickle=allow_pickle)) for s in d.encoders}
  trees = jax.tree.map(lambda x: jnp.asarray(x, dtype), trees)
  return prompts.PromptEncoder.from_description(d, trees, image_size, dtype)


def converted_dir(config, workdir: str) -> str:
  return config.teacher.converted or os.path.join(workdir, "converted")


def ensure_converted(config, workdir: str) -> str:
  """The converted checkpoint folder of this run, converting `teacher.pipeline` the first time."""
  out = converted_dir(config, workdir)
  if pipeline_io.is_converted(out):
    return out
  if not config.teacher.pipeline:
    raise ConfigError(f"no converted teacher in {out} and no Diffusers folder to convert: set "
                      f"--config.teacher.pipeline=PATH (a folder with model_index.json, its denoiser, ...)")
  logging.info("converting %s into %s", config.teacher.pipeline, out)
  trees = convert_pipeline(config.teacher.pipeline, variant=config.teacher.variant or None,
                           allow_pickle=config.teacher.allow_pickle)
  pipeline_io.save_converted(config.teacher.pipeline, out, trees)
  return out


def reference_folder(config) -> str:
  """`model.reference` as a folder: as given, or relative to the repository (configs/diffusers/...)."""
  path = config.model.reference
  for candidate in (path, os.path.join(REPO_ROOT, path)):
    if path and os.path.isfile(os.path.join(candidate, folders.MODEL_INDEX)):
      return candidate
  raise folders.FolderError(f"model.reference={path!r} is not a folder of published configs with "
                            f"{folders.MODEL_INDEX} (e.g. configs/diffusers/sdxl-base-1.0)")


def is_shape_only(config, workdir: str) -> bool:
  """No weights: no Diffusers folder and nothing converted before, only published configs."""
  return (not config.teacher.pipeline and not pipeline_io.is_converted(converted_dir(config, workdir))
          and bool(config.model.reference))


def pipeline_files(config, workdir: str) -> tuple:
  """(folder of the pipeline's configs, tokenizers and scheduler; converted checkpoint folder or None),
  converting the teacher on first use; shape-only runs read `model.reference` and have no checkpoint."""
  if is_shape_only(config, workdir):
    return reference_folder(config), None
  converted = ensure_converted(config, workdir)
  return os.path.join(converted, "pipeline"), converted


def _random_leaf(shape, how, dtype, key):
  if how[0] == "ones":
    return jnp.ones(shape, dtype)
  if how[0] == "zeros":
    return jnp.zeros(shape, dtype)
  return (how[1] * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def random_weights(abstract, shardings, key, dtype):
  """Random parameters made directly in their shards (no host copy).

  Kernels and embeddings ~ N(0, 1/fan_in) (embeddings 0.02^2), norm scales 1, biases 0: what
  makes activations behave at any depth, so timing and memory of shape-only runs are real. One
  jitted maker per (shape, init, sharding), called leaf by leaf with `fold_in(key, i)`: a single
  program for all leaves would hold every leaf's float32 draw at once (20 GB at SDXL's size).
  """
  flat = flax.traverse_util.flatten_dict(abstract)
  flat_shardings = flax.traverse_util.flatten_dict(shardings)
  makers, out = {}, {}
  for i, (path, leaf) in enumerate(sorted(flat.items())):
    kind = path[-1]
    if kind == "scale":
      how = ("ones",)
    elif kind == "bias" or len(leaf.shape) < 2:
      how = ("zeros",)
    else:
      how = ("normal", 0.02 if kind == "embedding" else float(np.prod(leaf.shape[:-1])) ** -0.5)
    spec = (tuple(leaf.shape), how, flat_shardings[path])
    if spec not in makers:
      makers[spec] = jax.jit(functools.partial(_random_leaf, tuple(leaf.shape), how, dtype),
                             out_shardings=flat_shardings[path])
    out[path] = makers[spec](jax.random.fold_in(key, i))
  jax.block_until_ready(out)
  for maker in makers.values():  # hundreds of small executables, ~1 GiB at SDXL's size: not needed again
    maker.clear_cache()
  return flax.traverse_util.unflatten_dict(out)


def frozen_weights(config, names, abstract: dict, axes: dict, converted: Optional[str], mesh, files: str) -> dict:
  """The denoiser and text encoders (`names`) in `model.teacher_dtype`, in their shards: restored from the
  converted checkpoint (each tree read straight into its shards) or, shape-only, made at random."""
  rules = sharding.rules_from_config(config.mesh.rules)
  min_size = int(config.mesh.min_shard_size)
  dtype = jnp.dtype(config.model.teacher_dtype)
  targets = {name: sharding.tree_shardings(abstract[name], axes[name], mesh, rules, min_size) for name in names}
  if converted is None:
    logging.warning("shape-only run: no teacher.pipeline, so the denoiser and text encoders get RANDOM weights "
                    "from the configs in %s (for benchmarks and dry runs; nothing learned here is meaningful)",
                    files)
    return {name: random_weights(abstract[name], targets[name], rng.derive(config.seed, i, rng.Role.INIT), dtype)
            for i, name in enumerate(names)}
  flat = {(name,) + path: s for name in names for path, s in flax.traverse_util.flatten_dict(targets[name]).items()}
  replicated = sharding.replicated(mesh)
  where = lambda path, shape: flat.get(tuple(getattr(k, "key", k) for k in path), replicated)
  trees = pipeline_io.load_converted(converted, where, dtype=dtype)
  return {name: trees[name] for name in names}
