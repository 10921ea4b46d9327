"""What an exported TDM student needs so that a stock Diffusers call samples it right.

Stock pipelines call `scheduler.set_timesteps(K)` and add classifier-free guidance (SDXL's default
5) unless the UNet declares `time_cond_proj_dim`, LCM's guidance embedding. A TDM student has its
guidance distilled in and was trained on tau_j = S - 1 - j S / K only. So the exported folder gets:

- a DDIMScheduler config with "trailing" spacing, steps_offset 0 and set_alpha_to_one. With
  S = the teacher's num_train_timesteps, its `set_timesteps(K)` gives exactly tau_j, each DDIM step
  lands on tau_{j+1}, and the last returns the clean estimate: our `sample.student_sample`;
- `time_cond_proj_dim` with an all-zero projection: pipelines skip CFG, and the guidance embedding
  they pass in adds exactly zero;
- for a unified student (tdm.step_choices), one folder per K whose K's step embedding is folded
  into the bias of the time embedding's last layer (exact: the embedding is added right after it);
- `tdm_student.json`: the step counts it was trained for and their timesteps, which
  `check_folder` compares with the folder's scheduler before our own tools sample it.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence, Tuple

import numpy as np

from tdm_jax.core import tdm
from tdm_jax.core.schedules import sampling_timesteps
from tdm_jax.infra.errors import ConfigError

GUIDANCE_EMBED_DIM = 256  # LCM-SDXL's time_cond_proj_dim
METADATA = "tdm_student.json"
STEP_EMBEDDING = "class_embedding"  # the unified student's table, Diffusers' class embedding
# Keys of the teacher's scheduler config that define its noise schedule.
_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                  "prediction_type", "rescale_betas_zero_snr")


def scheduler_config(teacher: Mapping[str, Any]) -> dict:
  """The student's DDIMScheduler config: the teacher's noise schedule, the student's step grid."""
  out = {"_class_name": "DDIMScheduler"}
  out.update({k: teacher[k] for k in _SCHEDULE_KEYS if k in teacher})
  out.update(timestep_spacing="trailing", steps_offset=0, set_alpha_to_one=True, clip_sample=False,
             thresholding=False)
  return out


def ddim_timesteps(config: Mapping[str, Any], num_steps: int) -> Tuple[np.ndarray, np.ndarray]:
  """(timesteps, where each DDIM step lands) of a DDIMScheduler config's `set_timesteps(num_steps)`;
  a landing point below 0 is the clean estimate (set_alpha_to_one) or timestep 0 (otherwise)."""
  n_train = int(config.get("num_train_timesteps", 1000))
  ts = sampling_timesteps(n_train, num_steps, config.get("timestep_spacing", "leading"),
                          int(config.get("steps_offset", 0)), scheduler="ddim")
  lands = ts - n_train // num_steps
  if not config.get("set_alpha_to_one", True):
    lands = np.where(lands < 0, 0, lands)
  return ts, np.where(lands < 0, -1, lands)


def student_grid(total_steps: int, num_steps: int) -> Tuple[np.ndarray, np.ndarray]:
  """(timesteps, landing points) of our student sampler: tau_j, then tau_{j+1}, the last -1 (x0)."""
  ts = tdm.student_timesteps(total_steps, num_steps).astype(np.int64)
  return ts, np.append(ts[1:], -1)


def _plain_ddim(config: Mapping[str, Any]) -> bool:
  """A DDIMScheduler that moves exactly as our DDIM does (Diffusers' DDIM clips x0 by default)."""
  return (config.get("_class_name", "DDIMScheduler") == "DDIMScheduler" and not config.get("clip_sample", True)
          and not config.get("thresholding", False))


def mismatched_counts(config: Mapping[str, Any], total_steps: int, step_counts: Sequence[int]) -> list:
  """The step counts K at which a stock call with this scheduler config would not sample the student."""
  same = lambda k: all(np.array_equal(a, b) for a, b in zip(student_grid(total_steps, k), ddim_timesteps(config, k)))
  return [int(k) for k in step_counts if not (_plain_ddim(config) and same(k))]


def guidance_free(params: Mapping[str, Any], unet_config: Mapping[str, Any]):
  """(params, config) of a UNet that stock pipelines run without CFG: LCM's `time_cond_proj_dim`
  with an all-zero projection, so the guidance embedding they pass changes nothing."""
  params = dict(params)
  embedding = dict(params["time_embedding"])
  width = int(np.shape(embedding["linear_1"]["kernel"])[0])
  embedding["cond_proj"] = {"kernel": np.zeros((GUIDANCE_EMBED_DIM, width), np.float32)}
  params["time_embedding"] = embedding
  return params, {**unet_config, "time_cond_proj_dim": GUIDANCE_EMBED_DIM}


def step_row(table, num_steps: int) -> np.ndarray:
  """Row K of a unified student's step table (float32), or an error naming the rows it has."""
  table = np.asarray(table, np.float32)
  if not 0 <= num_steps < table.shape[0]:
    raise ConfigError(f"the student's step table has rows 0..{table.shape[0] - 1}; cannot fold K={num_steps}")
  return table[num_steps]


def fold_step_embedding(params: Mapping[str, Any], unet_config: Mapping[str, Any], num_steps: int):
  """(params, config) of the unified student fixed at K = num_steps: row K of its step table added
  to the time embedding's output bias, the table and `num_class_embeds` removed."""
  params = dict(params)
  row = step_row(params.pop(STEP_EMBEDDING)["embedding"], num_steps)
  embedding = dict(params["time_embedding"])
  last = dict(embedding["linear_2"])
  last["bias"] = np.asarray(last["bias"], np.float32) + row
  embedding["linear_2"] = last
  params["time_embedding"] = embedding
  config = {k: v for k, v in unet_config.items() if k != "num_class_embeds"}
  return params, config


def write_metadata(folder: str, total_steps: int, step_counts: Sequence[int]) -> None:
  info = {"step_counts": [int(k) for k in step_counts], "total_steps": int(total_steps),
          "timesteps": {str(k): [int(t) for t in tdm.student_timesteps(total_steps, k)] for k in step_counts},
          "guidance": "distilled in: stock pipelines skip classifier-free guidance for this UNet"}
  with open(os.path.join(folder, METADATA), "w") as f:
    json.dump(info, f, indent=2)


def check_folder(folder: str, num_steps: int) -> None:
  """Raises ValueError when `folder` (an exported student pipeline) would not sample its student
  right at `num_steps`: a step count it was not trained for, or a scheduler that was swapped."""
  path = os.path.join(folder, METADATA)
  if not os.path.exists(path):
    raise ConfigError(f"{folder} has no {METADATA}: it is not a TDM student exported by this version")
  with open(path) as f:
    info = json.load(f)
  if int(num_steps) not in info["step_counts"]:
    raise ConfigError(f"{folder}: the student was trained for {info['step_counts']} steps, not {num_steps}; "
                      f"sample it with num_inference_steps in {info['step_counts']}")
  with open(os.path.join(folder, "scheduler", "scheduler_config.json")) as f:
    config = json.load(f)
  if mismatched_counts(config, info["total_steps"], [num_steps]):
    want = info["timesteps"][str(int(num_steps))]
    raise ConfigError(f"{folder}/scheduler ({config.get('_class_name')}, spacing "
                      f"{config.get('timestep_spacing')!r}) does not give the student's timesteps {want} at "
                      f"{num_steps} steps; restore the exported scheduler (DDIMScheduler, 'trailing', "
                      f"set_alpha_to_one) or sample with our sampler")
