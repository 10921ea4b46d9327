"""A Diffusers text-to-image pipeline (SD 1.5 / 2.x, SDXL) as a TDM `Task`.

The teacher comes from `teacher.pipeline` (a Diffusers folder), converted once into
`WORKDIR/converted` (or `teacher.converted`) and restored from there afterwards. Prompts come
from `data.prompt_file`; each iteration's batch is encoded by the pipeline's own text encoders.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from tdm_jax import data, pipeline
from tdm_jax.convert import folders
from tdm_jax.convert import pipeline as pipeline_io
from tdm_jax.models.clip import ClipConfig, CLIPTextEncoder
from tdm_jax.models.unet import UNet2DConditionModel, UNetConfig
from tdm_jax.schedules import from_diffusers_config
from tdm_jax.train import Task


def converted_dir(config, workdir: str) -> str:
  return config.teacher.converted or os.path.join(workdir, "converted")


def ensure_converted(config, workdir: str) -> str:
  """The converted checkpoint folder of this run, converting `teacher.pipeline` the first time."""
  out = converted_dir(config, workdir)
  if pipeline_io.is_converted(out):
    return out
  if not config.teacher.pipeline:
    raise ValueError(f"no converted teacher in {out} and no Diffusers folder to convert: set "
                     f"--config.teacher.pipeline=PATH (a folder with model_index.json, unet/, ...)")
  logging.warning("converting %s into %s", config.teacher.pipeline, out)
  pipeline_io.save_converted(config.teacher.pipeline, out, variant=config.teacher.variant or None,
                             allow_pickle=config.teacher.allow_pickle)
  return out


def unet_apply(model: UNet2DConditionModel):
  """`apply(params, x_t, t, cond)` over the UNet: cond holds encoder_hidden_states (+ SDXL's extras)."""
  if model.config.addition_embed_type == "text_time":
    return lambda params, x_t, t, cond: model.apply(
        {"params": params}, x_t, t, cond["encoder_hidden_states"],
        added_cond_kwargs={"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]})
  return lambda params, x_t, t, cond: model.apply({"params": params}, x_t, t, cond["encoder_hidden_states"])


def prompt_encoder(files: str, trees: dict, resolution: int) -> pipeline.PromptEncoder:
  """The pipeline's prompt path over converted trees (no second read of the weights)."""
  index = folders.read_model_index(files)
  pairs = [("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")]
  encoders = []
  for tok, enc in pairs:
    if enc not in trees:
      continue
    clip_config = ClipConfig.from_dict(folders.read_config(folders.component_path(files, enc)))
    encoders.append(pipeline.TextEncoder(tokenizer=pipeline.load_tokenizer(folders.component_path(files, tok)),
                                         model=CLIPTextEncoder(clip_config), params=trees[enc]))
  if not encoders:
    raise ValueError(f"the pipeline in {files} has no text encoder")
  return pipeline.PromptEncoder(encoders=tuple(encoders), kind="sdxl" if "text_encoder_2" in trees else "sd",
                                force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", False)),
                                image_size=(resolution, resolution))


def vae_scale_factor(files: str) -> int:
  vae_config = folders.read_config(folders.component_path(files, "vae"))
  return 2 ** (len(vae_config["block_out_channels"]) - 1)


def build_task(config, workdir: str, progress: bool = True) -> Task:
  del progress  # conversion has no progress bar
  if config.tdm.step_choices:
    raise ValueError("tdm.step_choices (step-count conditioning) needs a UNet with a step embedding; "
                     "Diffusers UNets have none: leave tdm.step_choices empty")
  out = ensure_converted(config, workdir)
  files = os.path.join(out, "pipeline")
  trees = pipeline_io.load_converted(out)
  unet_config = UNetConfig.from_dict(folders.read_config(folders.component_path(files, "unet")))
  dtype = jnp.dtype(config.model.dtype)
  model = UNet2DConditionModel(unet_config, dtype=dtype, attention_implementation=config.model.attention,
                               remat=config.model.remat)
  factor = vae_scale_factor(files)
  resolution = config.model.resolution or unet_config.sample_size * factor
  if resolution % (factor * 2 ** (len(unet_config.block_out_channels) - 1)):
    raise ValueError(f"model.resolution={resolution} must be a multiple of "
                     f"{factor * 2 ** (len(unet_config.block_out_channels) - 1)} for this pipeline")
  encode = prompt_encoder(files, trees, resolution)
  prompts = data.read_prompts(config.data.prompt_file)

  def batch(step: int, batch_size: int):
    cond, uncond = encode(data.prompt_batch(prompts, config.seed, step, batch_size))
    return jax.device_get(cond), jax.device_get(uncond)

  schedule = from_diffusers_config(folders.read_config(folders.component_path(files, "scheduler")))
  latent = resolution // factor
  teacher = jax.tree.map(lambda x: jnp.asarray(x, jnp.dtype(config.model.teacher_dtype)), trees["unet"])
  trainable = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), trees["unet"])
  return Task(apply=unet_apply(model), teacher_params=teacher, schedule=schedule,
              sample_shape=(unet_config.in_channels, latent, latent), batch=batch,
              student_init=trainable, fake_init=trainable)


def export(config, workdir: str, student_params) -> str:
  """The distilled student as `WORKDIR/export/unet` and a whole pipeline folder `WORKDIR/export/pipeline`."""
  out = ensure_converted(config, workdir)
  files = os.path.join(out, "pipeline")
  unet_config = folders.read_config(folders.component_path(files, "unet"))
  dest = os.path.join(workdir, "export")
  pipeline_io.export_unet(student_params, unet_config, os.path.join(dest, "unet"))
  trees = dict(pipeline_io.load_converted(out))
  trees["unet"] = student_params
  pipeline_io.export_pipeline(files, trees, os.path.join(dest, "pipeline"))
  return dest


def evaluate(config, workdir: str, task: Task, student_params) -> list:
  """One table row per sampler: the teacher with CFG at each of `eval.teacher_steps`, the student at
  each of `eval.student_steps`, all on the same prompts and the same noise.

  `eval.num_samples` prompts, each sampled `eval.samples_per_prompt` times (other noise). Rows hold
  NFE and ms per image (sampling + VAE decode of the whole batch, compilation excluded); with
  `eval.classifier` (shapes captions only) also Frechet distance to the real images of the prompts,
  adherence and per-prompt diversity. Writes WORKDIR/eval/<sampler>.png (one image per prompt) and
  WORKDIR/eval/comparison.png (a row per sampler, real images first when there are any).
  """
  from tdm_jax import evaluator, rng, sample  # pylint: disable=g-import-not-at-top
  from tdm_jax.models.vae import AutoencoderKL, VAEConfig  # pylint: disable=g-import-not-at-top
  out = ensure_converted(config, workdir)
  files = os.path.join(out, "pipeline")
  trees = pipeline_io.load_converted(out)
  e, cfg = config.eval, config.tdm
  prompts = data.read_prompts(e.prompt_file or config.data.prompt_file)[:e.num_samples]
  if e.samples_per_prompt < 1:
    raise ValueError(f"eval.samples_per_prompt must be >= 1, got {e.samples_per_prompt}")
  batch_prompts = [p for p in prompts for _ in range(e.samples_per_prompt)]
  firsts = np.arange(0, len(batch_prompts), e.samples_per_prompt)  # one image per prompt, for the grids
  cond, uncond = prompt_encoder(files, trees, task.sample_shape[-1] * vae_scale_factor(files))(batch_prompts)
  z = jax.random.normal(rng.derive(config.seed, 0, rng.Role.EVAL), (len(batch_prompts),) + tuple(task.sample_shape))
  vae = AutoencoderKL(VAEConfig.from_dict(folders.read_config(folders.component_path(files, "vae"))))
  scorer = evaluator.PromptScorer(e.classifier, batch_prompts) if e.classifier else None
  calls = 1 if cfg.guidance_scale == 1.0 else 2
  samplers = [(f"teacher, {n} DDIM steps, CFG {cfg.guidance_scale}", "teacher", calls * n,
               functools.partial(sample.teacher_sample, task.apply, task.teacher_params, task.schedule, num_steps=n,
                                 guidance_scale=cfg.guidance_scale, spacing="trailing"), (uncond,))
              for n in e.teacher_steps]
  samplers += [(f"TDM student, {n} steps", "student", n,
                functools.partial(sample.student_sample, task.apply, student_params, task.schedule, num_steps=n,
                                  total_steps=cfg.total_steps, solver=e.student_solver), ())
               for n in e.student_steps]
  os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
  columns = min(len(prompts), 8)
  rows, comparison = [], [scorer.real[firsts[:columns]]] if scorer else []
  for name, role, nfe, fn, extra in samplers:
    generate = lambda z, c, *x, fn=fn: vae.images_from_latents(trees["vae"], fn(z, c, *x))
    images, ms = sample.timed(generate, z, cond, *extra)
    pixels = sample.to_uint8(images)
    slug = f"{role}_{nfe}nfe"
    sample.save_pixel_grid(pixels[firsts], os.path.join(workdir, "eval", f"{slug}.png"), columns=columns, upscale=2,
                           pad=2)
    comparison.append(pixels[firsts[:columns]])
    row = {"sampler": name, "model": role, "nfe": nfe}
    if scorer:
      row.update(scorer(pixels))
    row.update(ms_per_image=ms / len(batch_prompts), grid=f"eval/{slug}.png")
    rows.append(row)
  sample.save_pixel_grid(np.concatenate(comparison), os.path.join(workdir, "eval", "comparison.png"),
                         columns=columns, upscale=2, pad=2)
  return rows
