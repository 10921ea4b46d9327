"""A Diffusers text-to-image pipeline (SD 1.5 / 2.x, SDXL) as a TDM `Task`.

The teacher comes from `teacher.pipeline` (a Diffusers folder), converted once into
`WORKDIR/converted` (or `teacher.converted`) and restored from there afterwards, each tree
straight into its shards on the mesh. Without a folder, `model.reference` (published configs,
no weights) gives random weights made on the mesh: shape-only runs for benchmarks and dry runs.

Prompts come from `data.prompt_source` (`tdm_jax/infra/data.py`); each process reads and tokenizes
only its rows of an iteration's batch on the host, and the text encoders run on device inside the
compiled step. With `model.lora_rank > 0` the student and the fake score are LoRA adapters over
the one frozen teacher (the paper's SDXL recipe); with 0 they are float32 copies.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Callable, NamedTuple, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from tdm_jax.convert import folders
from tdm_jax.convert import lora as lora_io
from tdm_jax.convert import pipeline as pipeline_io
from tdm_jax.convert import student as student_io
from tdm_jax.convert import unet as unet_io
from tdm_jax.core import lora, rng, tdm
from tdm_jax.core.schedules import from_diffusers_config
from tdm_jax.core.train import Task, sampling_params
from tdm_jax.infra import data, sharding
from tdm_jax.infra.errors import ConfigError
from tdm_jax.models.clip import ClipConfig, CLIPTextEncoder
from tdm_jax.models.unet import UNet2DConditionModel, UNetConfig
from tdm_jax.tasks.diffusers import pipeline

# This file is REPO_ROOT/tdm_jax/tasks/diffusers/task.py.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
ENCODERS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
DRY_RUN_PROMPTS = ("a photograph of an astronaut riding a horse", "a watercolour of a lighthouse at dusk",
                   "a red bicycle leaning on a brick wall", "a bowl of ramen, studio lighting")


def converted_dir(config, workdir: str) -> str:
  return config.teacher.converted or os.path.join(workdir, "converted")


def ensure_converted(config, workdir: str) -> str:
  """The converted checkpoint folder of this run, converting `teacher.pipeline` the first time."""
  out = converted_dir(config, workdir)
  if pipeline_io.is_converted(out):
    return out
  if not config.teacher.pipeline:
    raise ConfigError(f"no converted teacher in {out} and no Diffusers folder to convert: set "
                      f"--config.teacher.pipeline=PATH (a folder with model_index.json, unet/, ...)")
  logging.warning("converting %s into %s", config.teacher.pipeline, out)
  pipeline_io.save_converted(config.teacher.pipeline, out, variant=config.teacher.variant or None,
                             allow_pickle=config.teacher.allow_pickle)
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


def lora_config(config) -> Optional[lora.LoraConfig]:
  """`model.lora_*` as a LoraConfig (None for full copies), with errors that name the fix."""
  m = config.model
  if m.lora_rank == 0:
    return None
  if int(m.lora_rank) != m.lora_rank or m.lora_rank < 0:
    raise ConfigError(f"model.lora_rank={m.lora_rank!r} must be a positive integer (0: full copies, no LoRA)")
  if m.lora_alpha < 0:
    raise ConfigError(f"model.lora_alpha={m.lora_alpha!r} must be >= 0 (0 means alpha = rank, scale 1)")
  return lora.LoraConfig(rank=int(m.lora_rank), alpha=float(m.lora_alpha or m.lora_rank),
                         targets=tuple(m.lora_targets))


def unet_apply(model: UNet2DConditionModel):
  """`apply(params, x_t, t, cond, adapters=None, num_steps=None)` over the UNet: cond holds
  encoder_hidden_states (+ SDXL's extras); adapters, when given, are its "lora" collection (see
  `lora.adapters_applied`); num_steps, a unified student's K, its class label (`step_conditioned`)."""
  text_time = model.config.addition_embed_type == "text_time"

  def forward(params, x_t, t, cond, adapters=None, num_steps=None):
    variables = {"params": params} if adapters is None else {"params": params, "lora": adapters}
    extra = dict(added_cond_kwargs={"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}) if text_time else {}
    if num_steps is not None:
      extra["class_labels"] = num_steps
    return model.apply(variables, x_t, t, cond["encoder_hidden_states"], **extra)

  return forward


def step_conditioned(unet_config: UNetConfig, step_choices) -> UNetConfig:
  """The unified student's UNet: the teacher's plus a table of K embeddings (rows 0..max K) added to
  the time embedding, Diffusers' `num_class_embeds` mechanism; `step_table` starts it at zero."""
  if unet_config.num_class_embeds is not None:
    raise ConfigError(f"the teacher's UNet already has num_class_embeds={unet_config.num_class_embeds}; "
                      f"tdm.step_choices needs that slot for the step count: leave tdm.step_choices empty")
  return dataclasses.replace(unet_config, num_class_embeds=max(step_choices) + 1)


def step_table(unet_config: UNetConfig, step_choices) -> dict:
  """The unified student's all-zero K table, as a parameter subtree: with it the student computes
  exactly the teacher's function."""
  rows = step_conditioned(unet_config, step_choices).num_class_embeds
  return {student_io.STEP_EMBEDDING: {"embedding": jnp.zeros((rows, unet_config.time_embed_dim), jnp.float32)}}


def lora_unet_apply(model: UNet2DConditionModel, cfg: lora.LoraConfig):
  """`(base, adapters, x_t, t, cond, num_steps=None)` -> the UNet with adapters on its Dense layers (no
  merged copy); the adapter tree's leaves trained in full (a unified student's K table) join the base."""
  forward = unet_apply(model)

  def adapted(base, adapters, x_t, t, cond, **extra):
    pairs, _ = lora.split_full(adapters)
    with lora.adapters_applied(pairs, cfg):
      return forward(lora.with_full(base, adapters), x_t, t, cond, pairs, **extra)

  return adapted


def prompt_encoder(files: str, trees: dict, resolution: int) -> pipeline.PromptEncoder:
  """The pipeline's prompt path over converted trees (no second read of the weights)."""
  index = folders.read_model_index(files)
  encoders = []
  for tok, enc in ENCODERS:
    if enc not in trees:
      continue
    clip_config = ClipConfig.from_dict(folders.read_config(folders.component_path(files, enc)))
    encoders.append(pipeline.TextEncoder(tokenizer=pipeline.load_tokenizer(folders.component_path(files, tok)),
                                         model=CLIPTextEncoder(clip_config), params=trees[enc]))
  if not encoders:
    raise ConfigError(f"the pipeline in {files} has no text encoder")
  return pipeline.PromptEncoder(encoders=tuple(encoders), kind="sdxl" if "text_encoder_2" in trees else "sd",
                                force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", False)),
                                image_size=(resolution, resolution))


def vae_scale_factor(files: str) -> int:
  vae_config = folders.read_config(folders.component_path(files, "vae"))
  return 2 ** (len(vae_config["block_out_channels"]) - 1)


class Components(NamedTuple):
  """What the loop needs of a pipeline folder, with the abstract (shape-only) trees and logical axes."""
  files: str  # the folder of configs, tokenizers and scheduler
  converted: Optional[str]  # the converted checkpoint folder; None in shape-only runs
  unet_config: UNetConfig
  encoder_names: tuple  # (tokenizer, text_encoder) pairs present
  clip_configs: dict
  abstract: dict  # component -> unboxed ShapeDtypeStruct tree
  axes: dict  # component -> logical axis names


def components(config, workdir: str) -> Components:
  """The pipeline's configs (converting the folder on first use) and its trees' shapes and axis names."""
  converted = None
  if is_shape_only(config, workdir):
    files = reference_folder(config)
  else:
    converted = ensure_converted(config, workdir)
    files = os.path.join(converted, "pipeline")
  index = folders.read_model_index(files)
  unet_config = UNetConfig.from_dict(folders.read_config(folders.component_path(files, "unet")))
  boxed = {"unet": unet_io.abstract_params(unet_config)}
  pairs = tuple((tok, enc) for tok, enc in ENCODERS if isinstance(index.get(enc), (list, tuple))
                and index[enc][0] is not None)
  clip_configs = {}
  for _, enc in pairs:
    clip_configs[enc] = ClipConfig.from_dict(folders.read_config(folders.component_path(files, enc)))
    boxed[enc] = jax.eval_shape(functools.partial(CLIPTextEncoder(clip_configs[enc]).init, jax.random.key(0)),
                                jnp.zeros((1, 1), jnp.int32))["params"]
  if not pairs:
    raise ConfigError(f"the pipeline in {files} has no text encoder")
  return Components(files, converted, unet_config, pairs, clip_configs,
                    {k: flax.core.meta.unbox(v) for k, v in boxed.items()},
                    {k: sharding.logical_axes(v) for k, v in boxed.items()})


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


def frozen_weights(config, c: Components, mesh) -> dict:
  """UNet and text encoders in `model.teacher_dtype`, in their shards: restored from the converted
  checkpoint (each tree read straight into its shards) or, shape-only, made at random."""
  rules = sharding.rules_from_config(config.mesh.rules)
  min_size = int(config.mesh.min_shard_size)
  names = ("unet",) + tuple(enc for _, enc in c.encoder_names)
  dtype = jnp.dtype(config.model.teacher_dtype)
  targets = {name: sharding.tree_shardings(c.abstract[name], c.axes[name], mesh, rules, min_size) for name in names}
  if c.converted is None:
    logging.warning("shape-only run: no teacher.pipeline, so the UNet and text encoders get RANDOM weights from "
                    "the configs in %s (for benchmarks and dry runs; nothing learned here is meaningful)",
                    c.files)
    return {name: random_weights(c.abstract[name], targets[name], rng.derive(config.seed, i, rng.Role.INIT), dtype)
            for i, name in enumerate(names)}
  flat = {(name,) + path: s for name in names for path, s in flax.traverse_util.flatten_dict(targets[name]).items()}
  replicated = sharding.replicated(mesh)
  where = lambda path, shape: flat.get(tuple(getattr(k, "key", k) for k in path), replicated)
  trees = pipeline_io.load_converted(c.converted, where, dtype=dtype)
  return {name: trees[name] for name in names}


def _tokenizers(c: Components) -> list:
  if c.converted is None:
    return [pipeline.StandInTokenizer(cc.vocab_size, cc.bos_token_id or 0, cc.eos_token_id,
                                      cc.max_position_embeddings) for cc in c.clip_configs.values()]
  return [pipeline.load_tokenizer(folders.component_path(c.files, tok)) for tok, _ in c.encoder_names]


def build_task(config, workdir: str, progress: bool = True, devices=None, materialize: bool = True) -> Task:
  """The pipeline as a Task, its frozen weights placed on the mesh of `devices` (default: all).

  materialize=False leaves the frozen weights as ShapeDtypeStructs: enough to plan, lower and
  compile the step (benchmarks/memory.py), nothing to run.
  """
  del progress  # conversion has no progress bar
  lora_cfg = lora_config(config)
  choices = tuple(config.tdm.step_choices)
  c = components(config, workdir)
  unet_config = c.unet_config
  dtype = jnp.dtype(config.model.dtype)
  model = UNet2DConditionModel(unet_config, dtype=dtype, attention_implementation=config.model.attention,
                               remat=config.model.remat)
  factor = vae_scale_factor(c.files)
  resolution = config.model.resolution or unet_config.sample_size * factor
  multiple = factor * 2 ** (len(unet_config.block_out_channels) - 1)
  if resolution <= 0 or resolution % multiple:
    raise ConfigError(f"model.resolution={resolution} must be a positive multiple of {multiple} for this pipeline "
                      f"(VAE factor {factor} x UNet downsampling {multiple // factor}), e.g. "
                      f"{max(multiple, resolution // multiple * multiple)}")
  if lora_cfg is not None:
    lora.target_paths(c.abstract["unet"], lora_cfg)  # an unmatched target regex fails here, before any work
  mesh = sharding.make_mesh(config.mesh.shape, devices)
  if materialize:
    frozen = frozen_weights(config, c, mesh)
  else:
    teacher_dtype = jnp.dtype(config.model.teacher_dtype)
    frozen = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, teacher_dtype),
                          {name: c.abstract[name] for name in ("unet",) + tuple(e for _, e in c.encoder_names)})
  if c.converted is None and not config.data.prompt_source:
    source = data.PromptList(DRY_RUN_PROMPTS, config.seed, "dry-run prompts")  # a shape-only run needs none
  else:
    source = data.prompt_source(config)
  index = folders.read_model_index(c.files)
  force_zeros = bool(index.get("force_zeros_for_empty_prompt", False))
  kind = "sdxl" if "text_encoder_2" in c.clip_configs else "sd"
  tokenizers = _tokenizers(c)
  encoders = [CLIPTextEncoder(c.clip_configs[enc], dtype=dtype) for _, enc in c.encoder_names]
  negatives = [pipeline.token_ids(tok, [""])[0] for tok in tokenizers]

  def local_batch(step: int, batch_size: int, rows):
    mine = source.local_prompts(step, batch_size, rows)
    ids = [pipeline.token_ids(tok, mine) for tok in tokenizers]
    return {"ids": ids, "negative_ids": [np.tile(n, (len(mine), 1)) for n in negatives]}

  def batch(step: int, batch_size: int):
    return local_batch(step, batch_size, np.arange(batch_size))

  def condition(conditioner, inputs):
    encode = lambda ids_list: pipeline.unet_condition(
        kind, [enc.apply({"params": conditioner[name]}, ids)
               for enc, (_, name), ids in zip(encoders, c.encoder_names, ids_list)],
        ids_list[0].shape[0], (resolution, resolution))
    cond = encode(inputs["ids"])
    uncond = pipeline.unconditional(cond) if force_zeros else encode(inputs["negative_ids"])
    return cond, uncond

  schedule = from_diffusers_config(folders.read_config(folders.component_path(c.files, "scheduler")))
  latent = resolution // factor
  apply = unet_apply(model)
  as_float32 = lambda teacher: jax.tree.map(lambda x: x.astype(jnp.float32), teacher)
  init = None if lora_cfg else (lambda teacher, key: as_float32(teacher))
  adapted_model, student_apply, trainable_axes = model, None, None
  if choices:  # unified TDM: student and fake score are told K through a zero-initialised table
    adapted_model = model.clone(config=step_conditioned(unet_config, choices))
    student_apply = unet_apply(adapted_model)
    trainable_axes = {**c.axes["unet"], student_io.STEP_EMBEDDING: {"embedding": ("classes", "embed")}}
    if lora_cfg:  # the table is trained in full beside the adapters
      init = lambda teacher, key: {**lora.init_adapters(key, teacher, lora_cfg),
                                   **lora.in_full(step_table(unet_config, choices))}
    else:
      init = lambda teacher, key: {**as_float32(teacher), **step_table(unet_config, choices)}
  return Task(apply=apply, teacher_params=frozen["unet"], schedule=schedule,
              sample_shape=(unet_config.in_channels, latent, latent), batch=batch, local_batch=local_batch,
              student_apply=student_apply, fake_apply=student_apply,
              student_init=init, fake_init=init,
              lora=lora_cfg, lora_apply=lora_unet_apply(adapted_model, lora_cfg) if lora_cfg else None,
              param_axes=c.axes["unet"], trainable_axes=trainable_axes,
              conditioner={k: v for k, v in frozen.items() if k != "unet"},
              conditioner_axes={enc: c.axes[enc] for _, enc in c.encoder_names}, condition=condition,
              source=source)


def exported_step_counts(config) -> tuple:
  """The step counts the student was trained for: one exported pipeline folder each when unified."""
  return tdm.TDMConfig.from_config(config.tdm).all_step_counts


def exported_pipeline(config, workdir: str, num_steps: int) -> str:
  """WORKDIR/export/pipeline, or a unified student's WORKDIR/export/pipeline_{K}step."""
  name = f"pipeline_{num_steps}step" if config.tdm.step_choices else "pipeline"
  return os.path.join(workdir, "export", name)


def export(config, workdir: str, student_params) -> str:
  """The distilled student under WORKDIR/export, made for stock Diffusers calls
  (`convert/student.py`): a DDIM "trailing" scheduler that gives the student's timesteps, and a
  UNet that pipelines run without classifier-free guidance.

  `pipeline/` (the whole pipeline) and `unet/`; a unified student (tdm.step_choices) one of each per
  trained K, `pipeline_{K}step/` and `unet_{K}step/`, its K folded into the UNet (the text encoders and
  VAE are linked from the first). A LoRA student also as `lora/pytorch_lora_weights.safetensors`
  (Diffusers' `load_lora_weights`) and `lora_kohya.safetensors` (ComfyUI / A1111 / kohya key format),
  the merged folders holding the full-precision base plus its adapters. A unified LoRA student's
  K table is not low-rank: each K's row goes into `lora_{K}step/` (`lora_io.save_step_lora`), a
  second adapter loaded beside `lora/`; kohya files have no slot for it (Diffusers drops their bias
  keys for SDXL UNets), so none is written."""
  if is_shape_only(config, workdir):
    raise ConfigError("this run has random weights (no teacher.pipeline): there is no student worth exporting; "
                      "set --config.teacher.pipeline=PATH to distil a real teacher")
  out = ensure_converted(config, workdir)
  files = os.path.join(out, "pipeline")
  unet_config = folders.read_config(folders.component_path(files, "unet"))
  dest = os.path.join(workdir, "export")
  trees = dict(pipeline_io.load_converted(out))
  student = jax.device_get(student_params)
  lora_cfg = lora_config(config)
  counts = exported_step_counts(config)
  if lora_cfg is not None:
    pairs, full = lora.split_full(student)
    lora_io.save_lora(os.path.join(dest, "lora"), pairs, lora_cfg, unet_config)
    if config.tdm.step_choices:
      table = full[(student_io.STEP_EMBEDDING, "embedding")]
      for k in counts:
        lora_io.save_step_lora(os.path.join(dest, f"lora_{k}step"), student_io.step_row(table, k), unet_config)
      logging.warning("unified LoRA student: no lora_kohya.safetensors (kohya files cannot carry the step "
                      "table); use lora/ with lora_{K}step/ in Diffusers, or the merged pipeline_{K}step/")
    else:
      lora_io.save_kohya_lora(os.path.join(dest, "lora_kohya.safetensors"), pairs, lora_cfg, unet_config)
    base = jax.tree.map(lambda x: np.asarray(x, np.float32), trees["unet"])
    student = jax.device_get(lora.merge(base, student, lora_cfg))
  total_steps = int(config.tdm.total_steps)
  scheduler = student_io.scheduler_config(folders.read_config(folders.component_path(files, "scheduler")))
  bad = student_io.mismatched_counts(scheduler, total_steps, counts)
  if bad:
    logging.warning("tdm.total_steps=%d: a stock Diffusers scheduler cannot give the student's timesteps at %s "
                    "steps (set tdm.total_steps to the teacher's num_train_timesteps, %s); the exported pipeline "
                    "samples right only with our sampler", total_steps, bad, scheduler.get("num_train_timesteps"))
  first = None
  for k in counts:
    params, config_k = student, unet_config
    if config.tdm.step_choices:
      params, config_k = student_io.fold_step_embedding(student, unet_config, k)
    params, config_k = student_io.guidance_free(params, config_k)
    suffix = f"_{k}step" if config.tdm.step_choices else ""
    pipeline_io.export_unet(params, config_k, os.path.join(dest, "unet" + suffix))
    folder = exported_pipeline(config, workdir, k)
    pipeline_io.export_pipeline(files, {"unet": params} if first else {**trees, "unet": params}, folder,
                                configs={"unet": config_k, "scheduler": scheduler}, shared_from=first)
    student_io.write_metadata(folder, total_steps, [k] if config.tdm.step_choices else counts)
    first = first or folder
  return dest


def _samplers(config, task: Task, student_params, uncond, teacher_steps, student_steps) -> list:
  """(name, role, nfe, params, fn, extra args) per sampler: the teacher with CFG on Diffusers' "trailing"
  grid, the student on its own timesteps. Weights are arguments of the compiled samplers, never
  constants baked into them (GBs at SDXL size)."""
  from tdm_jax.core import sample  # pylint: disable=g-import-not-at-top
  cfg = config.tdm
  calls = 1 if cfg.guidance_scale == 1.0 else 2
  samplers = [(f"teacher, {n} DDIM steps, CFG {cfg.guidance_scale}", "teacher", calls * n, task.teacher_params,
               functools.partial(sample.teacher_sample, task.apply, num_steps=n,
                                 guidance_scale=cfg.guidance_scale, spacing="trailing"), (uncond,))
              for n in teacher_steps]
  trained = exported_step_counts(config)
  untrained = [n for n in student_steps if n not in trained]
  if untrained:
    logging.warning("student steps %s: the student was trained for %s steps only; those images show it "
                    "used off its training grid", untrained, list(trained))
  if cfg.step_choices and any(n > max(cfg.step_choices) for n in student_steps):
    raise ConfigError(f"student steps {list(student_steps)}: a unified student has step embeddings for "
                      f"K <= {max(cfg.step_choices)} only (tdm.step_choices={tuple(cfg.step_choices)})")
  samplers += [(f"TDM student, {n} steps", "student", n, sampling_params(task, student_params),
                functools.partial(sample.student_sample, task.student_apply or task.apply, num_steps=n,
                                  total_steps=cfg.total_steps, solver=config.eval.student_solver,
                                  step_conditioning=bool(cfg.step_choices)), ())
               for n in student_steps]
  return samplers


class _Renderer(NamedTuple):
  """Prompts -> images through our samplers, from one set of noise; one VAE decoder, compiled once."""
  files: str
  trees: dict
  cond: object
  uncond: object
  z: jax.Array
  decode: Callable  # jitted (vae params, latents) -> images, compiled on z: every sampler's latents have its shape

  def images(self, task: Task, sampler):
    """(uint8 NHWC pixels, ms for the batch: sampling plus decoding, compilation excluded) of one sampler."""
    from tdm_jax.core import sample  # pylint: disable=g-import-not-at-top
    _, _, _, params, fn, extra = sampler
    latents, ms = sample.timed(fn, params, task.schedule, self.z, self.cond, *extra)
    start = time.perf_counter()
    images = jax.block_until_ready(self.decode(self.trees["vae"], latents.astype(self.z.dtype)))
    return sample.to_uint8(images), ms + 1000.0 * (time.perf_counter() - start)


def _renderer(config, workdir: str, task: Task, prompts, key) -> _Renderer:
  from tdm_jax.models.vae import AutoencoderKL, VAEConfig  # pylint: disable=g-import-not-at-top
  out = ensure_converted(config, workdir)
  files = os.path.join(out, "pipeline")
  trees = pipeline_io.load_converted(out)
  cond, uncond = prompt_encoder(files, trees, task.sample_shape[-1] * vae_scale_factor(files))(prompts)
  z = jax.random.normal(key, (len(prompts),) + tuple(task.sample_shape))
  vae = AutoencoderKL(VAEConfig.from_dict(folders.read_config(folders.component_path(files, "vae"))))
  decode = jax.jit(vae.images_from_latents)
  jax.block_until_ready(decode(trees["vae"], z))  # compiled here, once, not inside any sampler's timing
  return _Renderer(files, trees, cond, uncond, z, decode)


def stock_diffusers_images(folder: str, prompts, z, num_steps: int, chunk: int = 64):
  """(uint8 NHWC pixels, ms) of the exported pipeline `folder` called as a Diffusers user would:
  prompts, the step count and the latents, nothing else. None when torch is not installed."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import diffusers  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  student_io.check_folder(folder, num_steps)
  pipe = diffusers.DiffusionPipeline.from_pretrained(folder, **(
      {"add_watermarker": False} if "text_encoder_2" in folders.read_model_index(folder) else {}))
  pipe.set_progress_bar_config(disable=True)
  latents = torch.from_numpy(np.asarray(z, np.float32))
  began, out = time.perf_counter(), []
  with torch.no_grad():
    for i in range(0, len(prompts), chunk):
      out.append(pipe(list(prompts[i:i + chunk]), num_inference_steps=num_steps, latents=latents[i:i + chunk],
                      output_type="np").images)
  ms = 1000.0 * (time.perf_counter() - began)
  return np.clip(np.round(np.concatenate(out) * 255.0), 0, 255).astype(np.uint8), ms


def evaluate(config, workdir: str, task: Task, student_params) -> list:
  """One table row per sampler: the teacher with CFG at each of `eval.teacher_steps`, the student at
  each of `eval.student_steps`, all on the same prompts and the same noise; then, when torch is
  installed and the student was exported, the exported pipeline called by stock Diffusers at each
  trained step count (what a Diffusers user gets).

  `eval.num_samples` prompts, each sampled `eval.samples_per_prompt` times (other noise). Rows hold
  NFE and ms per image (sampling + VAE decode of the whole batch, compilation excluded); with
  `eval.classifier` (shapes captions only) also Frechet distance to the real images of the prompts,
  adherence and per-prompt diversity. Writes WORKDIR/eval/<sampler>.png (one image per prompt) and
  WORKDIR/eval/comparison.png (a row per sampler, real images first when there are any).
  """
  from tdm_jax.core import sample  # pylint: disable=g-import-not-at-top
  from tdm_jax.tasks.shapes import evaluator  # pylint: disable=g-import-not-at-top
  if is_shape_only(config, workdir):
    raise ConfigError("this run has random weights (no teacher.pipeline) and no VAE or tokenizer to evaluate "
                      "with; set --config.train.evaluate_after=False for shape-only runs")
  e = config.eval
  prompts = (data.read_prompts(e.prompt_file) if e.prompt_file
             else data.prompt_source(config).head(e.num_samples))[:e.num_samples]
  if e.samples_per_prompt < 1:
    raise ConfigError(f"eval.samples_per_prompt must be >= 1, got {e.samples_per_prompt}")
  batch_prompts = [p for p in prompts for _ in range(e.samples_per_prompt)]
  firsts = np.arange(0, len(batch_prompts), e.samples_per_prompt)  # one image per prompt, for the grids
  r = _renderer(config, workdir, task, batch_prompts, rng.derive(config.seed, 0, rng.Role.EVAL))
  scorer = evaluator.PromptScorer(e.classifier, batch_prompts) if e.classifier else None
  os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
  columns = min(len(prompts), 8)
  rows, comparison = [], [scorer.real[firsts[:columns]]] if scorer else []

  def add_row(name, role, nfe, slug, pixels, ms):
    sample.save_pixel_grid(pixels[firsts], os.path.join(workdir, "eval", f"{slug}.png"), columns=columns, upscale=2,
                           pad=2)
    comparison.append(pixels[firsts[:columns]])
    row = {"sampler": name, "model": role, "nfe": nfe}
    if scorer:
      row.update(scorer(pixels))
    row.update(ms_per_image=ms / len(batch_prompts), grid=f"eval/{slug}.png")
    rows.append(row)

  for sampler in _samplers(config, task, student_params, r.uncond, e.teacher_steps, e.student_steps):
    name, role, nfe = sampler[:3]
    add_row(name, role, nfe, f"{role}_{nfe}nfe", *r.images(task, sampler))
  for k in [k for k in e.student_steps if k in exported_step_counts(config)]:
    folder = exported_pipeline(config, workdir, k)
    if not os.path.isdir(folder):
      break  # not exported (train.export_after False): nothing a Diffusers user would load
    try:
      student_io.check_folder(folder, k)
    except ValueError as err:  # e.g. a tdm.total_steps no stock scheduler reproduces
      logging.warning("no stock Diffusers row at %d steps: %s", k, err)
      continue
    stock = stock_diffusers_images(folder, batch_prompts, r.z, k)
    if stock is None:
      logging.warning("torch is not installed: the evaluation skips the exported pipeline's stock Diffusers rows")
      break
    add_row(f"exported pipeline in stock Diffusers, {k} steps", "diffusers", k, f"diffusers_{k}nfe", *stock)
  sample.save_pixel_grid(np.concatenate(comparison), os.path.join(workdir, "eval", "comparison.png"),
                         columns=columns, upscale=2, pad=2)
  return rows


def sample_prompts(config, workdir: str, task: Task, student_params, prompts, checkpoint_step: int) -> str:
  """`--mode=sample`: the student at `sample.student_steps` (default: the counts it was trained for) and
  the teacher at `sample.teacher_steps` with CFG, all from the same noise, as PNGs
  (WORKDIR/samples/<step>/<sampler>/<i>.png) and one grid (a row per sampler, a column per prompt)."""
  from tdm_jax.core import sample  # pylint: disable=g-import-not-at-top
  if is_shape_only(config, workdir):
    raise ConfigError("this run has random weights (no teacher.pipeline): nothing worth sampling")
  if not prompts:
    raise ConfigError("no prompts to sample: pass --prompt=TEXT (repeatable) or --prompt_file=FILE")
  s = config.sample
  student_steps = tuple(s.student_steps) or exported_step_counts(config)
  teacher_steps = (s.teacher_steps,) if s.teacher_steps else ()
  r = _renderer(config, workdir, task, list(prompts), rng.derive(s.seed, 0, rng.Role.EVAL))
  out = os.path.join(workdir, "samples", str(checkpoint_step))
  rows = []
  for sampler in _samplers(config, task, student_params, r.uncond, teacher_steps, student_steps):
    name, role, nfe = sampler[:3]
    pixels, _ = r.images(task, sampler)
    slug = f"teacher_{nfe // (1 if config.tdm.guidance_scale == 1.0 else 2)}steps" if role == "teacher" else \
        f"student_{nfe}steps"
    os.makedirs(os.path.join(out, slug), exist_ok=True)
    for i, image in enumerate(pixels):
      sample.save_pixel_grid(image[None], os.path.join(out, slug, f"{i:03d}.png"), columns=1)
    rows.append(pixels)
    logging.warning("%s: %s", name, os.path.join(out, slug))
  with open(os.path.join(out, "prompts.txt"), "w") as f:
    f.write("\n".join(prompts) + "\n")
  sample.save_pixel_grid(np.concatenate(rows), os.path.join(out, "grid.png"), columns=len(prompts), pad=2)
  return out
