"""Evaluation and sampling of a distilled Diffusers student beside its teacher.

Every sampler draws from the same prompts and the same noise; images (or clips, for video teachers) are
decoded by one VAE decoder compiled once. Images are written as PNG grids; clips as MP4 files and
animated GIF grids (`infra/video.py`). After our samplers, each exported pipeline is called by stock Diffusers as a user
would (prompts, the step count, the latents, and only what its family's stock call needs), so the
table shows what a Diffusers user gets.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Callable, NamedTuple

import jax
import numpy as np
from absl import logging

from tdm_jax.convert import pipeline as pipeline_io
from tdm_jax.convert import student as student_io
from tdm_jax.core import rng, sample
from tdm_jax.core.train import Task, sampling_params
from tdm_jax.infra import data, video
from tdm_jax.infra.errors import ConfigError
from tdm_jax.tasks.diffusers import prompts, weights
from tdm_jax.tasks.diffusers.description import describe
from tdm_jax.tasks.diffusers.export import exported_pipeline


def _samplers(config, task: Task, student_params, uncond, teacher_steps, student_steps) -> list:
  """(name, role, nfe, params, fn, extra args) per sampler: the teacher with CFG on Diffusers' "trailing"
  grid, the student on its own timesteps. Weights are arguments of the compiled samplers, never
  constants baked into them (GBs at SDXL size)."""
  cfg = task.run.tdm
  calls = 1 if cfg.guidance_scale == 1.0 else 2
  move = task.schedule.move_name  # the same move; its flow name (Euler) on a flow teacher
  samplers = [(f"teacher, {n} {move} steps, CFG {cfg.guidance_scale}", "teacher", calls * n, task.teacher_params,
               functools.partial(sample.teacher_sample, task.apply, num_steps=n,
                                 guidance_scale=cfg.guidance_scale, spacing="trailing"), (uncond,))
              for n in teacher_steps]
  trained = task.run.step_counts
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
  """Prompts -> images (or clips) through our samplers, from one set of noise; one VAE decoder, compiled once."""
  trees: dict
  cond: object
  uncond: object
  z: jax.Array
  decode: Callable  # jitted (vae params, latents) -> images, compiled on z: every sampler's latents have its shape
  video: bool  # clips (B, F, ...) rather than images

  def images(self, task: Task, sampler):
    """(uint8 pixels, NHWC or clips (N, F, H, W, C), ms for the batch: sampling plus decoding, compilation
    excluded) of one sampler."""
    _, _, _, params, fn, extra = sampler
    latents, ms = sample.timed(fn, params, task.schedule, self.z, self.cond, *extra)
    start = time.perf_counter()
    images = jax.block_until_ready(self.decode(self.trees["vae"], latents.astype(self.z.dtype)))
    pixels = video.to_uint8(images) if self.video else sample.to_uint8(images)
    return pixels, ms + 1000.0 * (time.perf_counter() - start)


def _renderer(task: Task, prompt_list, key) -> _Renderer:
  run = task.run
  d = run.description
  trees = pipeline_io.load_converted(run.converted)
  encoder = prompts.PromptEncoder(run.family, prompts.encoder_modules(d, "float32", trees=trees),
                                  d.force_zeros_for_empty_prompt, run.geometry.image_size)
  cond, uncond = encoder(prompt_list)
  z = jax.random.normal(key, (len(prompt_list),) + tuple(task.sample_shape))
  decode = jax.jit(d.decoder())
  jax.block_until_ready(decode(trees["vae"], z))  # compiled here, once, not inside any sampler's timing
  return _Renderer(trees, cond, uncond, z, decode, d.vae.video)


def stock_diffusers_images(folder: str, prompt_list, z, num_steps: int, chunk: int = 64):
  """(uint8 NHWC pixels, or (N, F, H, W, C) clips of a video pipeline, ms) of the exported pipeline `folder`
  called as a Diffusers user would: prompts, the step count, the latents and its family's stock-call
  arguments (docs/export.md), nothing else. None when torch is not installed."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import diffusers  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  student_io.check_folder(folder, num_steps)
  d = describe(folder)
  family = d.family
  pipe = diffusers.DiffusionPipeline.from_pretrained(folder, **dict(family.stock_load))
  pipe.set_progress_bar_config(disable=True)
  latents = torch.from_numpy(np.array(z, np.float32))  # a writable copy: torch warns on read-only arrays
  began, out = time.perf_counter(), []
  with torch.no_grad():
    for i in range(0, len(prompt_list), chunk):
      result = pipe(list(prompt_list[i:i + chunk]), num_inference_steps=num_steps, latents=latents[i:i + chunk],
                    output_type="np", **dict(family.stock_call), **student_io.stock_call_extra(folder, num_steps))
      out.append(np.asarray(result.frames if d.vae.video else result.images))
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
  WORKDIR/eval/comparison.png (a labelled row per sampler, real images first when there are any); for
  video, WORKDIR/eval/<sampler>.gif and .mp4 (one clip per prompt, tiled) and comparison.gif.
  """
  if weights.is_shape_only(config, workdir):
    raise ConfigError("this run has random weights (no teacher.pipeline) and no VAE or tokenizer to evaluate "
                      "with; set --config.train.evaluate_after=False for shape-only runs")
  e = config.eval
  prompt_list = (data.read_prompts(e.prompt_file) if e.prompt_file
                 else data.prompt_source(config).head(e.num_samples))[:e.num_samples]
  if e.samples_per_prompt < 1:
    raise ConfigError(f"eval.samples_per_prompt must be >= 1, got {e.samples_per_prompt}")
  batch_prompts = [p for p in prompt_list for _ in range(e.samples_per_prompt)]
  firsts = np.arange(0, len(batch_prompts), e.samples_per_prompt)  # one image per prompt, for the grids
  r = _renderer(task, batch_prompts, rng.derive(config.seed, 0, rng.Role.EVAL))
  scorer = _scorer(e.classifier, batch_prompts, r.video) if e.classifier else None
  os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
  columns = min(len(prompt_list), 8)
  rows = []
  comparison = [("real " + ("clips" if r.video else "images"), scorer.real[firsts[:columns]])] if scorer else []

  def add_row(name, role, nfe, slug, pixels, ms):
    grid = os.path.join("eval", f"{slug}.gif" if r.video else f"{slug}.png")
    if r.video:
      tiled = video.grid_frames(pixels[firsts], columns, pad=2)
      video.write_labelled_animation([(name, tiled[None])], os.path.join(workdir, grid), upscale=2)
      video.write_mp4(tiled, os.path.join(workdir, "eval", f"{slug}.mp4"), upscale=2)
    else:
      sample.save_pixel_grid(pixels[firsts], os.path.join(workdir, grid), columns=columns, upscale=2, pad=2)
    comparison.append((name, pixels[firsts[:columns]]))
    row = {"sampler": name, "model": role, "nfe": nfe}
    if scorer:
      row.update(scorer(pixels))
    row.update(ms_per_image=ms / len(batch_prompts), grid=grid)
    rows.append(row)

  for sampler in _samplers(config, task, student_params, r.uncond, e.teacher_steps, e.student_steps):
    name, role, nfe = sampler[:3]
    add_row(name, role, nfe, f"{role}_{nfe}nfe", *r.images(task, sampler))
  for k in [k for k in e.student_steps if k in task.run.step_counts]:
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
  if r.video:
    video.write_labelled_animation(comparison, os.path.join(workdir, "eval", "comparison.gif"), upscale=2, pad=2)
  else:
    sample.save_labelled_grid(comparison, os.path.join(workdir, "eval", "comparison.png"), upscale=2, pad=2)
  return rows


def _scorer(path: str, prompt_list, is_video: bool):
  """The shapes evaluator that scores this run's samples against real ones of the same captions: the image
  classifier, or for video teachers the moving-shapes video classifier (adds temporal consistency)."""
  if is_video:
    from tdm_jax.tasks.shapes import video_evaluator  # pylint: disable=g-import-not-at-top
    return video_evaluator.VideoPromptScorer(path, prompt_list)
  from tdm_jax.tasks.shapes import evaluator  # pylint: disable=g-import-not-at-top
  return evaluator.PromptScorer(path, prompt_list)


def sample_prompts(config, workdir: str, task: Task, student_params, prompt_list, checkpoint_step: int) -> str:
  """`--mode=sample`: the student at `sample.student_steps` (default: the counts it was trained for) and
  the teacher at `sample.teacher_steps` with CFG, all from the same noise, as PNGs
  (WORKDIR/samples/<step>/<sampler>/<i>.png) and one grid (a labelled row per sampler, a column per prompt);
  video as MP4 files (<i>.mp4) and an animated grid (grid.gif)."""
  if weights.is_shape_only(config, workdir):
    raise ConfigError("this run has random weights (no teacher.pipeline): nothing worth sampling")
  if not prompt_list:
    raise ConfigError("no prompts to sample: pass --prompt=TEXT (repeatable) or --prompt_file=FILE")
  s = config.sample
  student_steps = tuple(s.student_steps) or task.run.step_counts
  teacher_steps = (s.teacher_steps,) if s.teacher_steps else ()
  r = _renderer(task, list(prompt_list), rng.derive(s.seed, 0, rng.Role.EVAL))
  out = os.path.join(workdir, "samples", str(checkpoint_step))
  rows = []
  for sampler in _samplers(config, task, student_params, r.uncond, teacher_steps, student_steps):
    name, role, nfe = sampler[:3]
    pixels, _ = r.images(task, sampler)
    slug = f"teacher_{nfe // (1 if task.run.tdm.guidance_scale == 1.0 else 2)}steps" if role == "teacher" else \
        f"student_{nfe}steps"
    os.makedirs(os.path.join(out, slug), exist_ok=True)
    for i, image in enumerate(pixels):
      if r.video:
        video.write_mp4(image, os.path.join(out, slug, f"{i:03d}.mp4"))
      else:
        sample.save_pixel_grid(image[None], os.path.join(out, slug, f"{i:03d}.png"), columns=1)
    rows.append((name, pixels))
    logging.info("%s: %s", name, os.path.join(out, slug))
  with open(os.path.join(out, "prompts.txt"), "w") as f:
    f.write("\n".join(prompt_list) + "\n")
  if r.video:
    video.write_labelled_animation(rows, os.path.join(out, "grid.gif"), pad=2)
  else:
    sample.save_labelled_grid(rows, os.path.join(out, "grid.png"), pad=2)
  return out
