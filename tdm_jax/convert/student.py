"""What an exported TDM student needs so that a stock Diffusers call samples it right.

Stock pipelines call `scheduler.set_timesteps(K)` and add classifier-free guidance unless told
otherwise. A TDM student has its guidance distilled in and was trained on tau_j = S - 1 - j S / K
only. So every exported folder gets (what is family-specific, the backbone's `guidance_free` and
`fold_steps`, lives in `tasks/diffusers/backbones/`):

- a DDIMScheduler config with "trailing" spacing, steps_offset 0 and set_alpha_to_one. With
  S = the teacher's num_train_timesteps, its `set_timesteps(K)` gives exactly tau_j, each DDIM step
  lands on tau_{j+1}, and the last returns the clean estimate: our `sample.student_sample`;
- where the family has a slot for it, a way for pipelines to skip CFG (a UNet's `time_cond_proj_dim`
  with an all-zero projection); PixArt pipelines have none and are called with guidance_scale=1;
- for a unified student (tdm.step_choices), one folder per K with K's step embedding folded into
  the network (exact), since stock pipelines pass no step count;
- `tdm_student.json`: the step counts it was trained for and their timesteps, which
  `check_folder` compares with the folder's scheduler before our own tools sample it.

Rectified-flow students (SD3 / SD3.5) sit on sigma_j = shift((K - j) / K), which no stock
`set_timesteps(K)` gives (it spaces sigmas from 1 to about 1/1000 before shifting). Their folders get
a FlowMatchEulerDiscreteScheduler with the student's shift as a static one (no dynamic shifting), and
the stock call passes the unshifted grid `sigmas=[1, (K-1)/K, ..., 1/K]` that it then warps onto the
student's (`stock_sigmas`; recorded in tdm_student.json and passed by `stock_call_extra`).
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional, Sequence, Tuple

import numpy as np

from tdm_jax.core import tdm
from tdm_jax.core.schedules import FLOW_SCHEDULERS, FlowSchedule, sampling_timesteps, vp_from_diffusers_config
from tdm_jax.infra.errors import ConfigError

METADATA = "tdm_student.json"
# Keys of the teacher's scheduler config that define its noise schedule.
def is_flow(config: Mapping[str, Any]) -> bool:
  """Whether a scheduler config is a flow-matching one (the student's grid is then in sigma)."""
  return config.get("_class_name") in FLOW_SCHEDULERS


def stock_sigmas(num_steps: int) -> list:
  """The sigmas a stock flow pipeline call passes for a K-step student (`FlowSchedule.stock_sigmas`)."""
  return FlowSchedule().stock_sigmas(num_steps)


def scheduler_config(teacher: Mapping[str, Any], total_steps: Optional[int] = None, schedule=None) -> dict:
  """The student's scheduler config: the training `schedule`'s (`student_scheduler_config`: DDIM "trailing"
  over the teacher's noise schedule, or a flow teacher's static-shift FlowMatchEulerDiscreteScheduler).
  Without `schedule`, a VP teacher's is read from its config; a flow teacher's grid needs the schedule."""
  if schedule is None:
    if is_flow(teacher):
      raise ValueError("a flow teacher's student scheduler needs the training schedule (its student grid)")
    schedule = vp_from_diffusers_config(dict(teacher))
  return schedule.student_scheduler_config(dict(teacher), total_steps)


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


def student_grid(total_steps: int, num_steps: int, schedule=None) -> Tuple[np.ndarray, np.ndarray]:
  """(timesteps, landing points) of our student sampler: tau_j, then tau_{j+1}, the last -1 (x0); a
  `schedule` given its student timesteps outright (`tdm.student_timesteps`) lands on those."""
  ts = tdm.student_timesteps(total_steps, num_steps, schedule).astype(np.int64)
  return ts, np.append(ts[1:], -1)


def _plain_ddim(config: Mapping[str, Any]) -> bool:
  """A DDIMScheduler that moves exactly as our DDIM does (Diffusers' DDIM clips x0 by default)."""
  name = config.get("_class_name", "DDIMScheduler")
  if name == "CogVideoXDDIMScheduler":  # it never clips nor thresholds
    return True
  return name == "DDIMScheduler" and not config.get("clip_sample", True) and not config.get("thresholding", False)


def flow_stock_timesteps(config: Mapping[str, Any], num_steps: int) -> np.ndarray:
  """The timesteps (1000 sigma, float32) of a flow scheduler config's `set_timesteps(sigmas=stock_sigmas(K))`;
  with dynamic shifting they depend on the image size, so such a config gives none (NaNs)."""
  if config.get("use_dynamic_shifting", False):
    return np.full(num_steps, np.nan, np.float32)
  flow = FlowSchedule.from_diffusers_config(dict(config))
  return np.asarray(flow.num_train_timesteps * flow.warp(np.asarray(stock_sigmas(num_steps), np.float32)),
                    np.float32)


def mismatched_counts(config: Mapping[str, Any], total_steps: int, step_counts: Sequence[int],
                      schedule=None) -> list:
  """The step counts K at which a stock call with this scheduler config would not sample the student (for
  a flow scheduler, called with `stock_sigmas(K)`; `schedule` the training one, whose student grid it is)."""
  if is_flow(config):
    want = lambda k: tdm.student_timesteps(total_steps, k, schedule)
    return [int(k) for k in step_counts
            if not np.allclose(flow_stock_timesteps(config, k), want(k), rtol=1e-5, atol=1e-3)]
  same = lambda k: all(np.array_equal(a, b) for a, b in zip(student_grid(total_steps, k, schedule),
                                                             ddim_timesteps(config, k)))
  return [int(k) for k in step_counts if not (_plain_ddim(config) and same(k))]


def guidance_note(stock_call: Mapping[str, Any], flow: bool) -> str:
  """tdm_student.json's word on guidance, from what the family's stock call passes: pipelines with no slot
  that turns classifier-free guidance off (PixArt, SD3, CogVideoX) are called with guidance_scale=1;
  UNets skip it by themselves (the exported time_cond_proj_dim)."""
  if "guidance_scale" not in stock_call:
    return "distilled in: stock pipelines skip classifier-free guidance for this UNet (time_cond_proj_dim)"
  return (f"distilled in: call with guidance_scale={float(stock_call['guidance_scale'])}"
          + (" and sigmas=the entry for K above" if flow else ""))


def write_metadata(folder: str, total_steps: int, step_counts: Sequence[int],
                   schedule=None, call: Optional[Mapping[str, Any]] = None,
                   stock_call: Mapping[str, Any] = ()) -> None:
  """tdm_student.json; `call`: arguments every stock call of the folder must pass (e.g. a T5 length);
  `stock_call`: the family's constant stock-call arguments, for the guidance note."""
  info = {"step_counts": [int(k) for k in step_counts], "total_steps": int(total_steps)}
  if call:
    info["call"] = dict(call)
  info["timesteps"] = {str(k): tdm.student_timesteps(total_steps, k, schedule).tolist() for k in step_counts}
  sigmas = {str(k): schedule.stock_sigmas(k) for k in step_counts} if schedule is not None else {}
  if any(sigmas.values()):
    info["sigmas"] = sigmas
  info["guidance"] = guidance_note(dict(stock_call), flow="sigmas" in info)
  with open(os.path.join(folder, METADATA), "w") as f:
    json.dump(info, f, indent=2)


def _metadata(folder: str) -> dict:
  path = os.path.join(folder, METADATA)
  if not os.path.exists(path):
    raise ConfigError(f"{folder} has no {METADATA}: it is not a TDM student exported by this version")
  with open(path) as f:
    return json.load(f)


def stock_call_extra(folder: str, num_steps: int) -> dict:
  """What a stock call of exported student `folder` passes beyond its family's arguments: the recorded
  `call` ones (a T5 length the student was trained at), and a flow student's `sigmas` for K = num_steps."""
  info = _metadata(folder)
  out = dict(info.get("call", {}))
  if info.get("sigmas"):
    out["sigmas"] = list(info["sigmas"][str(int(num_steps))])
  return out


def check_folder(folder: str, num_steps: int) -> None:
  """Raises ValueError when `folder` (an exported student pipeline) would not sample its student
  right at `num_steps`: a step count it was not trained for, or a scheduler that was swapped."""
  info = _metadata(folder)
  if int(num_steps) not in info["step_counts"]:
    raise ConfigError(f"{folder}: the student was trained for {info['step_counts']} steps, not {num_steps}; "
                      f"sample it with num_inference_steps in {info['step_counts']}")
  with open(os.path.join(folder, "scheduler", "scheduler_config.json")) as f:
    config = json.load(f)
  want = np.asarray(info["timesteps"][str(int(num_steps))])
  if "sigmas" in info:
    got = flow_stock_timesteps(config, num_steps) if is_flow(config) else np.full(len(want), np.nan)
    if not np.allclose(got, want, rtol=1e-5, atol=1e-3):
      raise ConfigError(f"{folder}/scheduler ({config.get('_class_name')}, shift {config.get('shift')}, dynamic "
                        f"shifting {config.get('use_dynamic_shifting')}) does not give the student's timesteps "
                        f"{want.tolist()} from sigmas={info['sigmas'][str(int(num_steps))]} at {num_steps} steps; "
                        f"restore the exported scheduler (FlowMatchEulerDiscreteScheduler, static shift) or "
                        f"sample with our sampler")
    return
  if mismatched_counts(config, info["total_steps"], [num_steps]):
    want = info["timesteps"][str(int(num_steps))]
    raise ConfigError(f"{folder}/scheduler ({config.get('_class_name')}, spacing "
                      f"{config.get('timestep_spacing')!r}) does not give the student's timesteps {want} at "
                      f"{num_steps} steps; restore the exported scheduler (DDIMScheduler, 'trailing', "
                      f"set_alpha_to_one) or sample with our sampler")
