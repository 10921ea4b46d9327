"""Sampling: the distilled student in few steps, the teacher in many, with DDIM or DPM-Solver++ (2M).

On a rectified-flow schedule the DDIM move is the flow ODE's Euler step (what Diffusers'
FlowMatchEulerDiscreteScheduler does), and DPM-Solver++ runs on the same half log-SNR log((1 - sigma) / sigma).
Every sampler is a `lax.scan` over its timesteps, so one compiled program serves any batch
of noise; all take the `apply(params, x_t, t, cond, **extra)` callables of tdm.py.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from tdm_jax.core import tdm
from tdm_jax.core.schedules import Schedule, ddim_step, dpm_solver_2m_step
from tdm_jax.infra.errors import ConfigError

SOLVERS = ("ddim", "euler", "dpm_solver_2m")  # "euler": "ddim" by its flow name, the same move


def _next_steps(timesteps, final_timestep, dtype):
  timesteps = jnp.asarray(timesteps, dtype)
  return timesteps, jnp.append(timesteps[1:], final_timestep).astype(dtype)


def sample(apply, params, schedule: Schedule, z, cond, timesteps, *, solver: str = "ddim", uncond=None,
           guidance_scale: float = 1.0, final_timestep: int = -1, lower_order_final: bool = True, **extra):
  """Deterministic sampling from z (taken as x at timesteps[0]) down to `final_timestep`.

  final_timestep -1 returns the clean estimate; Diffusers' DDIM with set_alpha_to_one=False
  stops at timestep 0 instead, which `final_timestep=0` reproduces.
  """
  if solver not in SOLVERS:
    raise ConfigError(f"unknown solver {solver!r}; expected one of {SOLVERS}")
  dtype = schedule.timestep_dtype
  timesteps, next_steps = _next_steps(timesteps, final_timestep, dtype)
  batch = z.shape[0]
  full = lambda t: jnp.full((batch,), t, dtype)

  def denoise(x, t):
    return tdm.guided_predict(apply, params, schedule, x, full(t), cond, uncond, guidance_scale, **extra)

  if solver in ("ddim", "euler"):
    def ddim(x, ts):
      t, t_next = ts
      x0, eps = denoise(x, t)
      return ddim_step(schedule, x0, eps, full(t_next)), None

    x, _ = jax.lax.scan(ddim, z, (timesteps, next_steps))
    return x

  num = timesteps.shape[0]
  first_order = np.zeros(num, bool)
  first_order[0] = True
  if lower_order_final and num < 15:
    first_order[-1] = True
  prev_steps = jnp.concatenate([timesteps[:1], timesteps[:-1]])

  def dpm(carry, inputs):
    x, x0_prev = carry
    t, t_prev, t_next, first = inputs
    x0, _ = denoise(x, t)
    x_next = dpm_solver_2m_step(schedule, x, x0, x0_prev, full(t), full(t_prev), full(t_next), first)
    return (x_next, x0), None

  (x, _), _ = jax.lax.scan(dpm, (z, jnp.zeros_like(z)),
                           (timesteps, prev_steps, next_steps, jnp.asarray(first_order)))
  return x


def student_sample(apply, params, schedule: Schedule, z, cond, *, num_steps: int, total_steps: int,
                   solver: str = "ddim", step_conditioning: bool = False, **extra):
  """The distilled student: no guidance, one call per step on its own timesteps tau_j."""
  if step_conditioning:
    extra["num_steps"] = jnp.full((z.shape[0],), num_steps, jnp.int32)
  return sample(apply, params, schedule, z, cond, tdm.student_timesteps(total_steps, num_steps, schedule),
                solver=solver, **extra)


def teacher_sample(apply, params, schedule: Schedule, z, cond, uncond, *, num_steps: int,
                   guidance_scale: float, solver: str = "ddim", spacing: str = "leading", steps_offset: int = 0,
                   final_timestep: int = -1):
  """The teacher with classifier-free guidance on Diffusers' timesteps for `num_steps` (on a flow schedule
  FlowMatchEulerDiscreteScheduler's, whatever `spacing` says)."""
  timesteps = schedule.teacher_grid(num_steps, spacing, steps_offset, solver)
  return sample(apply, params, schedule, z, cond, timesteps, solver=solver, uncond=uncond,
                guidance_scale=guidance_scale, final_timestep=final_timestep)


def timed(fn, *args):
  """(outputs, milliseconds) of one call of `fn`, compiled ahead of time: the time excludes compilation."""
  compiled = jax.jit(fn).lower(*args).compile()
  start = time.perf_counter()
  out = jax.block_until_ready(compiled(*args))
  return out, 1000.0 * (time.perf_counter() - start)


def to_uint8(images_nchw) -> np.ndarray:
  """Images in [-1, 1], NCHW -> uint8 NHWC."""
  x = np.asarray(jax.device_get(images_nchw), np.float32)
  return np.clip(np.round((x.transpose(0, 2, 3, 1) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def save_grid(images_nchw, path: str, columns: int) -> None:
  """A PNG grid of a batch of images in [-1, 1] (NCHW), `columns` wide, row-major."""
  save_pixel_grid(to_uint8(images_nchw), path, columns)


def save_pixel_grid(pixels, path: str, columns: int, upscale: int = 1, pad: int = 0) -> None:
  """A PNG grid of uint8 NHWC images, `columns` wide, row-major, nearest-neighbour upscaled, with
  `pad` white pixels between images."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  pixels = np.asarray(pixels)
  if upscale > 1:
    pixels = pixels.repeat(upscale, axis=1).repeat(upscale, axis=2)
  n, h, w, c = pixels.shape
  rows = -(-n // columns)
  grid = np.full((rows * (h + pad) - pad, columns * (w + pad) - pad, c), 255, np.uint8)
  for i, image in enumerate(pixels):
    r, col = divmod(i, columns)
    grid[r * (h + pad):r * (h + pad) + h, col * (w + pad):col * (w + pad) + w] = image
  Image.fromarray(grid if c == 3 else grid[..., 0]).save(path)


def save_labelled_grid(rows, path: str, upscale: int = 1, pad: int = 0) -> None:
  """A PNG grid with one row per (label, uint8 NHWC images) pair and the label written to its left,
  so that a reader can tell which row is which sampler."""
  labelled_grid(rows, upscale, pad).save(path)


def labelled_grid(rows, upscale: int = 1, pad: int = 0):
  """`save_labelled_grid`'s picture, as a PIL image (an animated grid is one per frame)."""
  from PIL import Image, ImageDraw, ImageFont  # pylint: disable=g-import-not-at-top
  rows = [(label, np.asarray(pixels)) for label, pixels in rows]
  columns = max(len(p) for _, p in rows)
  font = ImageFont.load_default()
  draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  label_width = max(int(draw.textlength(label, font=font)) for label, _ in rows) + 8
  h, w = (s * upscale for s in rows[0][1].shape[1:3])
  row_height = max(h, 12)
  grid = Image.new("RGB", (label_width + columns * (w + pad), len(rows) * (row_height + pad) - pad), "white")
  canvas = ImageDraw.Draw(grid)
  for r, (label, pixels) in enumerate(rows):
    top = r * (row_height + pad)
    canvas.text((4, top + max(0, (row_height - 11) // 2)), label, fill="black", font=font)
    if upscale > 1:
      pixels = pixels.repeat(upscale, axis=1).repeat(upscale, axis=2)
    for c, image in enumerate(pixels):
      tile = Image.fromarray(image if image.shape[-1] == 3 else image[..., 0]).convert("RGB")
      grid.paste(tile, (label_width + c * (w + pad), top))
  return grid
