"""The distilled student under WORKDIR/export, made for stock Diffusers calls.

Per trained step count K (one folder per K for a unified student, `tdm.step_choices`): the whole
pipeline `pipeline_{K}step/` (or `pipeline/`) with the student's denoiser, also alone as
`{denoiser}_{K}step/`; the text encoders and VAE are written once and linked from the others. Every
folder carries a DDIM "trailing" scheduler that gives the student's timesteps (a flow student's: a
FlowMatchEulerDiscreteScheduler with its shift, called with `sigmas`) and `tdm_student.json`
(`convert/student.py`); the family makes the denoiser sample right without a step count and, where it
has a slot for it, without classifier-free guidance (`backbones/`). A LoRA student's merged folders
hold the full-precision base plus its adapters; families whose pipelines load LoRA files (UNets) also
get those (`Backbone.write_lora`).
"""

from __future__ import annotations

import os
from typing import Optional

import jax
import numpy as np
from absl import logging

from tdm_jax.convert import pipeline as pipeline_io
from tdm_jax.convert import student as student_io
from tdm_jax.core import lora, tdm
from tdm_jax.infra.errors import ConfigError
from tdm_jax.tasks.diffusers import weights
from tdm_jax.tasks.diffusers.build import Run, make_run


def stock_size_arguments(family, geometry) -> dict:
  """The stock-call arguments the family sizes from the run's geometry (video: height, width, num_frames)."""
  sizes = {"height": geometry.height, "width": geometry.width, "num_frames": geometry.frames}
  return {k: sizes[k] for k in family.stock_size_keys}


def exported_pipeline(config, workdir: str, num_steps: int) -> str:
  """WORKDIR/export/pipeline, or a unified student's WORKDIR/export/pipeline_{K}step."""
  unified = tdm.TDMConfig.from_config(config.tdm).step_conditioning
  return os.path.join(workdir, "export", f"pipeline_{num_steps}step" if unified else "pipeline")


def export(config, workdir: str, student_params, run: Optional[Run] = None) -> str:
  """Writes WORKDIR/export (see the module docstring) from the run the student trained in (`Task.run`;
  None: made from `config`, as `--mode=export` on a fresh process does); returns it."""
  if weights.is_shape_only(config, workdir):
    raise ConfigError("this run has random weights (no teacher.pipeline): there is no student worth exporting; "
                      "set --config.teacher.pipeline=PATH to distil a real teacher")
  run = run or make_run(config, workdir)
  d, files, lora_cfg, counts, unified = run.description, run.files, run.lora, run.step_counts, run.unified
  backbone = d.backbone
  dest = os.path.join(workdir, "export")
  trees = dict(pipeline_io.load_converted(run.converted))
  student = jax.device_get(student_params)
  if lora_cfg is not None:
    pairs, full = lora.split_full(student)
    if backbone.write_lora is not None:
      backbone.write_lora(dest, pairs, full, lora_cfg, d.denoiser_config_dict, counts, unified)
    base = jax.tree.map(lambda x: np.asarray(x, np.float32), trees[d.denoiser])
    student = jax.device_get(lora.merge(base, student, lora_cfg))
  total_steps, schedule, family = int(run.tdm.total_steps), run.schedule, run.family
  scheduler = student_io.scheduler_config(d.scheduler_config, total_steps, schedule)
  bad = student_io.mismatched_counts(scheduler, total_steps, counts, schedule)
  if bad:
    logging.warning("tdm.total_steps=%d: a stock Diffusers scheduler cannot give the student's timesteps at %s "
                    "steps; the exported pipeline samples right only with our sampler", total_steps, bad)
  # What the stock call passes beyond the family's constant arguments: a changed T5 length, a video's size.
  call = {k: v for k, v in family.stock_call if k not in dict(d.family.stock_call)}
  call.update(stock_size_arguments(family, run.geometry))
  first = None
  for k in counts:
    params, config_k = student, d.denoiser_config_dict
    if unified:
      params, config_k = backbone.fold_steps(student, config_k, k)
    params, config_k = backbone.guidance_free(params, config_k)
    suffix = f"_{k}step" if unified else ""
    d.write_component(d.denoiser, params, config_k, os.path.join(dest, d.denoiser + suffix))
    folder = exported_pipeline(config, workdir, k)
    pipeline_io.export_pipeline(files, {d.denoiser: params} if first else {**trees, d.denoiser: params}, folder,
                                d.write_component, components=d.model_components,
                                configs={d.denoiser: config_k, "scheduler": scheduler}, shared_from=first)
    student_io.write_metadata(folder, total_steps, [k] if unified else counts, schedule, call=call,
                              stock_call=dict(family.stock_call))
    first = first or folder
  return dest
