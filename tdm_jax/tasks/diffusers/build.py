"""A Diffusers pipeline as a TDM `Task`: its denoiser through the backbone family that serves it, its
prompts tokenized on the host (each process only its rows of an iteration's batch) and encoded by the
text encoders inside the compiled step, its frozen weights placed on the mesh.

The run itself (`Run`: the folder's description, the prompt family at the run's T5 length, the latent
geometry, the schedule with the student's grid, the LoRA and TDM configs) is read and checked once,
before anything compiles, and travels with the task (`Task.run`) to export, evaluation and sampling.

With `model.lora_rank > 0` the student and the fake score are LoRA adapters over the one frozen
teacher (the paper's SDXL recipe); with 0 they are float32 copies. With `tdm.step_choices` they are
told K through the family's zero-initialised step table (unified TDM).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

from tdm_jax.core import lora, tdm
from tdm_jax.core.schedules import from_diffusers_config
from tdm_jax.core.train import Task
from tdm_jax.infra import data, sharding
from tdm_jax.infra.errors import ConfigError
from tdm_jax.models.attention import check_attention_fits
from tdm_jax.tasks.diffusers import prompts, weights
from tdm_jax.tasks.diffusers.description import PipelineDescription, describe
from tdm_jax.tasks.diffusers.geometry import LatentGeometry

DRY_RUN_PROMPTS = ("a photograph of an astronaut riding a horse", "a watercolour of a lighthouse at dusk",
                   "a red bicycle leaning on a brick wall", "a bowl of ramen, studio lighting")
STEP_AXES = ("classes", "embed")  # the unified student's K table


def lora_config(config, description: Optional[PipelineDescription] = None) -> Optional[lora.LoraConfig]:
  """`model.lora_*` as a LoraConfig (None for full copies), with errors that name the fix. Empty
  `model.lora_targets` takes the backbone family's own targets."""
  m = config.model
  if m.lora_rank == 0:
    return None
  if int(m.lora_rank) != m.lora_rank or m.lora_rank < 0:
    raise ConfigError(f"model.lora_rank={m.lora_rank!r} must be a positive integer (0: full copies, no LoRA)")
  if m.lora_alpha < 0:
    raise ConfigError(f"model.lora_alpha={m.lora_alpha!r} must be >= 0 (0 means alpha = rank, scale 1)")
  targets = tuple(m.lora_targets) or (description.backbone.lora_targets if description else lora.DEFAULT_TARGETS)
  return lora.LoraConfig(rank=int(m.lora_rank), alpha=float(m.lora_alpha or m.lora_rank), targets=targets)


def step_table(d: PipelineDescription, step_choices) -> dict:
  """The unified student's all-zero K table (rows 0..max K), as a parameter subtree: with it the student
  computes exactly the teacher's function."""
  rows = max(step_choices) + 1
  abstract = flax.core.meta.unbox(d.backbone.abstract_params(d.backbone.with_step_embeds(d.denoiser_config, rows)))
  shape = abstract[d.backbone.step_table]["embedding"].shape
  return {d.backbone.step_table: {"embedding": jnp.zeros(shape, jnp.float32)}}


def abstract_trees(d: PipelineDescription) -> tuple:
  """({component: unboxed ShapeDtypeStruct tree}, {component: logical axis names}) of the denoiser and
  the text encoders."""
  boxed = {d.denoiser: d.backbone.abstract_params(d.denoiser_config)}
  boxed.update({s.encoder: s.kind.abstract_params(s.config) for s in d.encoders})
  return ({k: flax.core.meta.unbox(v) for k, v in boxed.items()},
          {k: sharding.logical_axes(v) for k, v in boxed.items()})


def run_family(config, d: PipelineDescription) -> prompts.PipelineFamily:
  """The pipeline's prompt family with this run's T5 length (`model.max_sequence_length`; 0: the family's)."""
  n = int(config.model.max_sequence_length)
  family = d.family.with_max_length(n) if n else d.family
  if d.backbone.check_family is not None:
    d.backbone.check_family(d.denoiser_config, family)
  return family


@dataclasses.dataclass(frozen=True)
class Run:
  """A Diffusers teacher's run, read and checked once (`make_run`): what training, export, evaluation and
  `--mode=sample` all take, so that none of them re-reads the folder or re-derives the grid.

  files: the folder of the pipeline's configs, tokenizers and scheduler; converted: the converted
  checkpoint folder (None: a shape-only run). family: the prompt family at the run's T5 length.
  schedule: the teacher's, with the student's grid (`tdm.student_shift` / `tdm.student_timesteps`).
  """
  files: str
  converted: Optional[str]
  description: PipelineDescription
  family: prompts.PipelineFamily
  geometry: LatentGeometry
  schedule: Any
  lora: Optional[lora.LoraConfig]
  tdm: tdm.TDMConfig

  @property
  def step_counts(self) -> tuple:
    """The step counts the student trains for: one exported pipeline folder each when unified."""
    return self.tdm.all_step_counts

  @property
  def unified(self) -> bool:
    return self.tdm.step_conditioning


def make_run(config, workdir: str) -> Run:
  """The run of `config` in `workdir`, converting the teacher on first use; every option the folder or the
  config gets wrong (scheduler keys, sizes, frames, prompt length, LoRA targets) is refused here."""
  files, converted = weights.pipeline_files(config, workdir)
  d = describe(files)
  lora_cfg = lora_config(config, d)
  tdm_cfg = tdm.TDMConfig.from_config(config.tdm)
  geometry = d.geometry(config.model)  # model.resolution / height / width / num_frames, checked
  # The folder's scheduler (a flow's dynamic shift fixed by the run's token count) with the student's grid.
  schedule = tdm_cfg.student_schedule(from_diffusers_config(d.scheduler_config, image_seq_len=geometry.tokens))
  return Run(files=files, converted=converted, description=d, family=run_family(config, d), geometry=geometry,
             schedule=schedule, lora=lora_cfg, tdm=tdm_cfg)


def check_attention(config, run: Run, mesh) -> None:
  """Refuses, in one line naming `model.attention`, a run whose denoiser attention would hold a score matrix
  too large for a device (the teacher's guided pass runs both halves as one batch of twice the rows)."""
  shape = run.description.backbone.attention_shape
  if shape is None:
    return
  tokens, heads = shape(run.description.denoiser_config, run.geometry, run.family)
  rows = -(-int(config.train.batch_size) // int(np.prod([mesh.shape[a] for a in sharding.BATCH_AXES])))
  rows *= 1 if run.tdm.guidance_scale == 1.0 else 2
  check_attention_fits(tokens, tokens, heads, rows, config.model.attention, platform=mesh.devices.flat[0].platform)


def build_task(config, workdir: str, progress: bool = True, devices=None, materialize: bool = True) -> Task:
  """The pipeline as a Task, its frozen weights placed on the mesh of `devices` (default: all).

  materialize=False leaves the frozen weights as ShapeDtypeStructs: enough to plan, lower and
  compile the step (benchmarks/memory.py), nothing to run.
  """
  del progress  # conversion has no progress bar
  run = make_run(config, workdir)
  files, converted, d, family, geometry = run.files, run.converted, run.description, run.family, run.geometry
  backbone, lora_cfg, schedule = d.backbone, run.lora, run.schedule
  choices = tuple(run.tdm.step_choices)
  dtype = jnp.dtype(config.model.dtype)
  make_model = lambda cfg: backbone.module(cfg, dtype=dtype, attention_implementation=config.model.attention,
                                           remat=config.model.remat)
  model = make_model(d.denoiser_config)
  abstract, axes = abstract_trees(d)
  if lora_cfg is not None:
    lora.target_paths(abstract[d.denoiser], lora_cfg)  # an unmatched target regex fails here, before any work
  mesh = sharding.make_mesh(config.mesh.shape, devices)
  check_attention(config, run, mesh)
  names = (d.denoiser,) + tuple(s.encoder for s in d.encoders)
  if materialize:
    frozen = weights.frozen_weights(config, names, abstract, axes, converted, mesh, files)
  else:
    teacher_dtype = jnp.dtype(config.model.teacher_dtype)
    frozen = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, teacher_dtype), {n: abstract[n] for n in names})
  if converted is None and not config.data.prompt_source:
    source = data.PromptList(DRY_RUN_PROMPTS, config.seed, "dry-run prompts")  # a shape-only run needs none
  else:
    source = data.prompt_source(config)
  encoders = prompts.encoder_modules(d, config.model.dtype, shape_only=converted is None)
  force_zeros = d.force_zeros_for_empty_prompt
  negatives = prompts.host_tokens(family, encoders, [""])
  image_size = geometry.image_size

  def local_batch(step: int, batch_size: int, rows):
    mine = source.local_prompts(step, batch_size, rows)
    tile = lambda x: np.tile(x, (len(mine), 1))
    return {"prompt": prompts.host_tokens(family, encoders, mine),
            "negative": [jax.tree.map(tile, n) for n in negatives]}

  def batch(step: int, batch_size: int):
    return local_batch(step, batch_size, np.arange(batch_size))

  def condition(conditioner, inputs):
    params = [conditioner[e.name] for e in encoders]
    cond = prompts.encode(family, encoders, params, inputs["prompt"], image_size)
    uncond = (family.unconditional(cond) if force_zeros
              else prompts.encode(family, encoders, params, inputs["negative"], image_size))
    return cond, uncond

  apply = backbone.apply_fn(model)
  as_float32 = lambda teacher: jax.tree.map(lambda x: x.astype(jnp.float32), teacher)
  init = None if lora_cfg else (lambda teacher, key: as_float32(teacher))
  adapted_model, student_apply, trainable_axes = model, None, None
  if choices:  # unified TDM: student and fake score are told K through a zero-initialised table
    adapted_model = make_model(backbone.with_step_embeds(d.denoiser_config, max(choices) + 1))
    student_apply = backbone.apply_fn(adapted_model)
    table = step_table(d, choices)
    trainable_axes = {**axes[d.denoiser], backbone.step_table: {"embedding": STEP_AXES}}
    if lora_cfg:  # the table is trained in full beside the adapters
      init = lambda teacher, key: {**lora.init_adapters(key, teacher, lora_cfg), **lora.in_full(table)}
    else:
      init = lambda teacher, key: {**as_float32(teacher), **table}
  return Task(apply=apply, teacher_params=frozen[d.denoiser],
              schedule=schedule,
              sample_shape=geometry.latent_shape, batch=batch,
              local_batch=local_batch, student_apply=student_apply, fake_apply=student_apply,
              student_init=init, fake_init=init,
              lora=lora_cfg, lora_apply=lora_apply(backbone.apply_fn(adapted_model), lora_cfg) if lora_cfg else None,
              param_axes=axes[d.denoiser], trainable_axes=trainable_axes,
              conditioner={k: v for k, v in frozen.items() if k != d.denoiser},
              conditioner_axes={s.encoder: axes[s.encoder] for s in d.encoders}, condition=condition,
              source=source, run=run)


def lora_apply(forward, cfg: lora.LoraConfig):
  """`(base, adapters, x_t, t, cond, num_steps=None)` -> the backbone with adapters on its Dense layers (no
  merged copy); the adapter tree's leaves trained in full (a unified student's K table) join the base."""

  def adapted(base, adapters, x_t, t, cond, **extra):
    pairs, _ = lora.split_full(adapters)
    with lora.adapters_applied(pairs, cfg):
      return forward(lora.with_full(base, adapters), x_t, t, cond, pairs, **extra)

  return adapted
