"""Compiled memory of the TDM step at SDXL's real size, without weights, on fake CPU devices.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/memory.py \
      --devices=8 --mesh=1,8,1 --resolution=512 --batch_size=64 [--lora_rank=64] [--config=configs/sdxl.py]
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/memory.py \
      --config=configs/cogvideox_2b.py --devices=8 --mesh=1,8,1 --num_frames=49 --height=480 --width=720

Builds the shape-only task of the config (published configs in `configs/diffusers`, frozen
weights as ShapeDtypeStructs: nothing is allocated), plans the shardings as a real run does,
lowers and compiles the step, and prints one row per device: bytes of frozen weights (UNet base
and text encoders), of trainable parameters and of optimiser state held on one device, XLA's
temporaries, its total (arguments + outputs - donated aliases + temporaries), and the trace and
compile times. `--lora_rank=0` compiles full float32 copies of student and fake score.

The row also names the geometry (pixels, or frames x height x width for video), the denoiser's tokens
per sample (video: every latent frame's patches; plus the text tokens of a joint-attention transformer
such as CogVideoX's), and the attention setting with what it resolves to on this platform at that
length ("auto" is "chunked" on CPU for long sequences).
"""

import json
import os
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from tdm_jax.core import train  # pylint: disable=g-import-not-at-top,wrong-import-position
from tdm_jax.infra import sharding  # pylint: disable=g-import-not-at-top,wrong-import-position
from tdm_jax.models import attention  # pylint: disable=g-import-not-at-top,wrong-import-position
from tdm_jax.tasks.diffusers import build  # pylint: disable=g-import-not-at-top,wrong-import-position
from tdm_jax.tasks.diffusers import task as diffusers_task  # pylint: disable=g-import-not-at-top,wrong-import-position
from rows import abstract_step_args  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file("config", "configs/sdxl.py", "The run's config.")
_DEVICES = flags.DEFINE_integer("devices", 0, "Devices in the mesh (0: all).")
_MESH = flags.DEFINE_string("mesh", "", "data,fsdp,tensor sizes (default: the config's mesh.shape).")
_RESOLUTION = flags.DEFINE_integer("resolution", 0, "Pixels of a square frame (0: the config's).")
_HEIGHT = flags.DEFINE_integer("height", 0, "Pixels of a non-square frame, with --width (0: the config's).")
_WIDTH = flags.DEFINE_integer("width", 0, "Pixels of a non-square frame, with --height (0: the config's).")
_FRAMES = flags.DEFINE_integer("num_frames", 0, "Video teachers: pixel frames per clip (0: the config's).")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Global batch (0: the config's).")
_RANK = flags.DEFINE_integer("lora_rank", -1, "LoRA rank; 0: full copies (-1: the config's).")
_JSON = flags.DEFINE_string("json", "", "Also append the row as one JSON line to this file.")
_FORWARD = flags.DEFINE_bool("teacher_forward", False,
                             "Compile one teacher UNet forward instead of the step (what XLA:CPU adds per forward).")

GIB = 2 ** 30


def _teacher_forward(task, p, teacher, conditioner, inputs):
  """One conditional teacher forward on the batch, compiled like the step (same shardings)."""
  def forward(teacher, conditioner, inputs):
    cond, _ = task.conditioning(conditioner, inputs)
    x = jax.numpy.zeros((jax.tree.leaves(inputs)[0].shape[0],) + tuple(task.sample_shape))
    return task.apply(teacher, x, jax.numpy.full((x.shape[0],), 500), cond)
  began = time.perf_counter()
  lowered = jax.jit(forward, in_shardings=(p.teacher, p.conditioner, p.batch)).lower(teacher, conditioner, inputs)
  traced = time.perf_counter()
  compiled = lowered.compile()
  return compiled, {"trace_s": traced - began, "compile_s": time.perf_counter() - traced}


def _geometry(config, task, workdir):
  """The row's geometry: pixels (or frames x height x width), the denoiser's tokens per sample, the text
  tokens joined to them (video transformers attend over [text; video]), and the attention setting and
  what it runs at that length on this platform."""
  run = task.run if getattr(task, "run", None) is not None else build.make_run(config, workdir)
  g = run.geometry
  size = f"{g.height}x{g.width}" if g.height != g.width else f"{g.height}"
  row = {"geometry": f"{g.frames}x{size}" if g.video else size, "tokens": g.tokens}
  q_length = g.tokens
  if g.video:  # CogVideoX: one joint attention over [text; video], text padded to the transformer's length
    text = run.family.max_length or 0
    row.update(video_tokens=g.tokens, text_tokens=text, attention_tokens=g.tokens + text)
    q_length = g.tokens + text
  resolved = attention.resolve_implementation(config.model.attention, q_length, platform=jax.default_backend())
  row.update(attention=config.model.attention, attention_runs=resolved)
  return row


def main(_):
  config = _CONFIG.value
  if _MESH.value:
    config.mesh.shape = tuple(int(v) for v in _MESH.value.split(","))
  if _RESOLUTION.value:
    config.model.resolution = _RESOLUTION.value
  if _HEIGHT.value or _WIDTH.value:
    config.model.height, config.model.width = _HEIGHT.value, _WIDTH.value
  if _FRAMES.value:
    config.model.num_frames = _FRAMES.value
  if _BATCH.value:
    config.train.batch_size = _BATCH.value
  if _RANK.value >= 0:
    config.model.lora_rank = _RANK.value
    config.model.lora_alpha = float(_RANK.value)
  config.teacher.pipeline = ""  # shape-only: the published configs, no weights
  devices = jax.devices()[:_DEVICES.value] if _DEVICES.value else jax.devices()
  workdir = tempfile.mkdtemp()
  began = time.perf_counter()
  task = diffusers_task.build_task(config, workdir, devices=devices, materialize=False)
  shape = _geometry(config, task, workdir)
  mesh = sharding.make_mesh(config.mesh.shape, devices)
  with jax.set_mesh(mesh):
    p, teacher, conditioner, inputs = abstract_step_args(task, config, mesh)
    setup_s = time.perf_counter() - began
    if _FORWARD.value:
      compiled, times = _teacher_forward(task, p, teacher, conditioner, inputs)
    else:
      compiled, times = train.compile_step(train.make_train_step(task, config), p, p.abstract_state, teacher,
                                           conditioner, inputs)
  memory = train.memory_summary(compiled)
  state = p.abstract_state
  trainable = sharding.shard_bytes((state.student_params, state.fake_params, state.ema_params))
  optimizer = sharding.shard_bytes((state.student_opt_state, state.fake_opt_state))
  row = {
      "mode": ("teacher forward only" if _FORWARD.value else
               f"LoRA r{config.model.lora_rank}" if config.model.lora_rank else "full copies"),
      "devices": len(devices), "mesh": dict(mesh.shape), **shape,
      "global_batch": config.train.batch_size, "remat": config.model.remat,
      "frozen_gib": sharding.shard_bytes((teacher, conditioner)) / GIB, "trainable_gib": trainable / GIB,
      "optimizer_gib": optimizer / GIB, "temp_gib": memory.get("temp", np.nan) / GIB,
      "total_gib": memory.get("total", np.nan) / GIB, "setup_s": setup_s, **times,
  }
  print(" | ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
  if _JSON.value:
    with open(_JSON.value, "a") as f:
      f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  app.run(main)
