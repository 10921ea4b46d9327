"""The TDM iteration of `tdm_jax/core/tdm.py`, written in PyTorch on Diffusers' UNet2DConditionModel.

What a user would otherwise run: the authors' method on the Diffusers/Transformers modules, eager or
under `torch.compile`. It does the same work as our compiled step, in the same order: the text
encoders on the batch's token ids, the student's K-step DDIM rollout without gradients, the
fake-score update (min-SNR and importance-weighted x0 loss), then the generator update (the
teacher's classifier-free-guided x0 on a 2B batch, the updated fake score's x0, the pseudo-Huber
loss to the fixed target), each network with its AdamW (betas (0, 0.95), decoupled weight decay,
the student's global-norm clipping, `optim.lr_scales` as parameter groups) and the same
learning-rate schedules. Student and fake score are float32 copies of the teacher, or LoRA adapters
over the one frozen base (`model.lora_*`); a unified student (`tdm.step_choices`) has the zero-started
step table that Diffusers' `class_embedding` adds to the time embedding.

Every random number of an iteration is an `IterationDraws` (the fields of `tdm.iteration_draws`):
`torch_draws` makes them with torch's generator for benchmarks, and `jax_draws` hands over the very
numbers our step draws, for the equal-work test (tests/test_torch_iteration.py). Run through
`benchmarks/iteration.py`, which times this beside ours.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import diffusers
import transformers

from tdm_jax.convert import folders
from tdm_jax.convert.unet import diffusers_name
from tdm_jax.convert.unet import unet_state_dict_from_params
from tdm_jax.core import lora as lora_lib
from tdm_jax.core import tdm
from tdm_jax.core.optim import make_optimizers
from tdm_jax.infra.errors import ConfigError

ROLES = ("student", "fake")


class Segments(NamedTuple):
  j: torch.Tensor
  k: torch.Tensor
  t_k: torch.Tensor
  m_k: torch.Tensor


class SampleDraws(NamedTuple):
  m: torch.Tensor
  t: torch.Tensor
  noise: torch.Tensor


class IterationDraws(NamedTuple):
  num_steps: int
  z: torch.Tensor
  fake_segments: Segments
  fake_sample: SampleDraws
  generator_segments: Segments
  generator_sample: SampleDraws


def jax_draws(cfg: tdm.TDMConfig, seed: int, step: int, batch: int, sample_shape) -> IterationDraws:
  """The draws of our step at iteration `step` (seed `seed`), as torch tensors."""
  import jax  # pylint: disable=g-import-not-at-top
  from tdm_jax.core import rng  # pylint: disable=g-import-not-at-top
  d = jax.device_get(tdm.iteration_draws(cfg, rng.iteration_key(seed, step), batch, tuple(sample_shape)))
  t = lambda tree: type(tree)(*(torch.from_numpy(np.array(v)) for v in tree))
  return IterationDraws(int(d.num_steps), torch.from_numpy(np.array(d.z)), t(d.fake_segments), t(d.fake_sample),
                        t(d.generator_segments), t(d.generator_sample))


def step_grid(total_steps: int, num_steps: int):
  """(tau_j, next timestep, m_j) for j < K, as `tdm.step_grid`."""
  j = torch.arange(num_steps)
  taus = total_steps - 1 - (j * total_steps) // num_steps
  below = total_steps - 1 - ((j + 1) * total_steps) // num_steps
  last = j + 1 >= num_steps
  return taus, torch.where(last, -1, below), torch.where(last, 0, below + 1)


def torch_draws(cfg: tdm.TDMConfig, num_steps: int, batch: int, sample_shape, generator) -> IterationDraws:
  """An iteration's draws from torch's generator, distributed as `tdm.iteration_draws` makes them."""
  shape = (batch,) + tuple(sample_shape)
  taus, _, lows = step_grid(cfg.total_steps, num_steps)

  def segments():
    j = torch.randint(0, num_steps, (batch,), generator=generator)
    return Segments(j, num_steps - j, taus[j], lows[j])

  def sample(seg):
    m = seg.m_k
    if cfg.random_mid:
      m = seg.m_k + (torch.rand(batch, generator=generator) * (seg.t_k - cfg.mid_margin - seg.m_k)).long()
    hi = seg.t_k - cfg.upper_margin if cfg.interval_mode == "separate" else torch.full((batch,), cfg.total_steps -
                                                                                       cfg.upper_margin)
    lo = torch.clamp(m, min=cfg.min_timestep)
    t = lo + (torch.rand(batch, generator=generator) * (hi - lo)).long()
    return SampleDraws(m, t, torch.randn(shape, generator=generator))

  z = torch.randn(shape, generator=generator)
  fake = segments()
  fake_sample = sample(fake)
  gen = segments()
  return IterationDraws(num_steps, z, fake, fake_sample, gen, sample(gen))


class Schedule:
  """The discrete schedule of `tdm_jax/core/schedules.py` in torch (t = -1: clean data)."""

  def __init__(self, alphas_cumprod, prediction_type: str):
    self.alphas_cumprod = torch.from_numpy(np.array(alphas_cumprod, np.float32))
    self.prediction_type = prediction_type

  def alphabar(self, t):
    ab = self.alphas_cumprod[torch.clamp(t, 0, len(self.alphas_cumprod) - 1)]
    return torch.where(t < 0, torch.ones_like(ab), ab)

  def a(self, t):
    return torch.sqrt(self.alphabar(t))

  def s(self, t):
    return torch.sqrt(1.0 - self.alphabar(t))

  def to_x0_eps(self, output, x, t):
    a, s = _b(self.a(t), x), _b(self.s(t), x)
    output = output.float()
    if self.prediction_type == "epsilon":
      return (x - s * output) / a, output
    if self.prediction_type == "v_prediction":
      return a * x - s * output, a * output + s * x
    return output, (x - a * output) / s

  def add_noise(self, x0, eps, t):
    return _b(self.a(t), x0) * x0 + _b(self.s(t), x0) * eps

  def diffusion_coefficients(self, m, t):
    ab_m, ab_t = self.alphabar(m), self.alphabar(t)
    return torch.sqrt(ab_t / ab_m), torch.sqrt(torch.clamp(-torch.expm1(torch.log(ab_t) - torch.log(ab_m)), min=0.0))


def _b(v, x):
  return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def _mean_per_sample(x):
  return x.mean(dim=tuple(range(1, x.ndim)))


class LoraLinear(nn.Module):
  """A frozen Linear plus, for the active role, scale * (x a) b in the layer's dtype (as `lora.adapters_applied`)."""

  def __init__(self, base: nn.Linear, rank: int, scale: float, roles):
    super().__init__()
    self.base, self.scale, self.role = base, scale, None
    self.a = nn.ParameterDict({r: nn.Parameter(torch.zeros(base.in_features, rank)) for r in roles})
    self.b = nn.ParameterDict({r: nn.Parameter(torch.zeros(rank, base.out_features)) for r in roles})

  def forward(self, x):
    out = self.base(x)
    if self.role is None:
      return out
    low = (x.to(out.dtype) @ self.a[self.role].to(out.dtype)) @ self.b[self.role].to(out.dtype)
    return out + self.scale * low


class StepTable(nn.Module):
  """Per-role K tables in Diffusers' `class_embedding` slot: rows of float32, cast to the sample's dtype there."""

  def __init__(self, rows: int, width: int, roles):
    super().__init__()
    self.tables = nn.ParameterDict({r: nn.Parameter(torch.zeros(rows, width)) for r in roles})
    self.role = roles[0]

  def forward(self, labels):
    return F.embedding(labels, self.tables[self.role])


def _time_ids(batch: int, resolution: int):
  return torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch, dtype=torch.float32)


@dataclasses.dataclass
class Frozen:
  unet: nn.Module
  encoders: list  # (name, module) in pipeline order
  force_zeros: bool
  kind: str  # "sd" or "sdxl"


def load_frozen(folder: Optional[str], dtype, *, reference: Optional[str] = None) -> Frozen:
  """The teacher UNet and text encoders of a Diffusers folder; with `reference` (a folder of configs only),
  random weights built directly in `dtype`."""
  files = folder or reference
  index = folders.read_model_index(files)
  names = [n for n in ("text_encoder", "text_encoder_2") if isinstance(index.get(n), (list, tuple))
           and index[n][0] is not None]
  encoders = []
  if folder:
    unet = diffusers.UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet"), torch_dtype=dtype)
    for name in names:
      cls = getattr(transformers, index[name][1])
      encoders.append((name, cls.from_pretrained(os.path.join(folder, name), torch_dtype=dtype)))
  else:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
      unet = diffusers.UNet2DConditionModel.from_config(folders.read_config(os.path.join(reference, "unet")))
      for name in names:
        cls = getattr(transformers, index[name][1])
        encoders.append((name, cls(cls.config_class.from_pretrained(os.path.join(reference, name)))))
    finally:
      torch.set_default_dtype(previous)
  for module in [unet] + [m for _, m in encoders]:
    module.eval().requires_grad_(False)
  return Frozen(unet, encoders, bool(index.get("force_zeros_for_empty_prompt", False)),
                "sdxl" if "text_encoder_2" in names else "sd")


class TorchTDM:
  """One TDM iteration per `iterate(inputs, draws)` on Diffusers modules; the run's config decides everything.

  config: the run's ml_collections config (tdm, optim, model.lora_*, model.dtype, train.num_iterations);
  frozen: `load_frozen(...)`; schedule: our `Schedule` (its alphas_cumprod and prediction type);
  resolution: pixels (for SDXL's time ids). compile: wrap the UNet(s) in `torch.compile`.
  """

  def __init__(self, config, frozen: Frozen, schedule, resolution: int, compile: bool = False):
    self.cfg = tdm.TDMConfig.from_config(config.tdm)
    if self.cfg.condition_fake_on_segment or config.train.ema_decay:
      raise ConfigError("torch_iteration mirrors the configs we benchmark: no tdm.condition_fake_on_segment, no EMA")
    self.dtype = getattr(torch, str(config.model.dtype))
    self.frozen, self.resolution = frozen, resolution
    self.schedule = Schedule(np.asarray(schedule.alphas_cumprod), schedule.prediction_type)
    self.lora = int(config.model.lora_rank)
    self.unified = bool(self.cfg.step_choices)
    teacher = frozen.unet
    width = teacher.time_embedding.linear_2.out_features
    rows = max(self.cfg.all_step_counts) + 1
    if self.lora:
      scale = float(config.model.lora_alpha or self.lora) / self.lora
      patterns = [re.compile(p) for p in (config.model.lora_targets or lora_lib.DEFAULT_TARGETS)]
      self.adapted = {}
      for name, module in list(teacher.named_modules()):
        for child_name, child in list(module.named_children()):
          full = f"{name}.{child_name}" if name else child_name
          if isinstance(child, nn.Linear) and any(p.search(_our_path(full) + "/kernel") for p in patterns):
            wrapped = LoraLinear(child, self.lora, scale, ROLES)
            setattr(module, child_name, wrapped)
            self.adapted[full] = wrapped
      if not self.adapted:
        raise ConfigError(f"model.lora_targets={tuple(config.model.lora_targets)} match no Linear of the UNet")
      for w in self.adapted.values():
        for r in ROLES:
          nn.init.normal_(w.a[r], std=1.0 / self.lora)
      self.table = StepTable(rows, width, ROLES) if self.unified else None
      self.nets = {r: teacher for r in ("teacher",) + ROLES}
      self.params = {r: [w.a[r] for w in self.adapted.values()] + [w.b[r] for w in self.adapted.values()]
                     for r in ROLES}
      self.full_params = {r: [self.table.tables[r]] if self.table is not None else [] for r in ROLES}
    else:
      if self.dtype != torch.float32:
        raise ConfigError("full-copy students are float32 here (model.dtype float32); use LoRA for bf16")
      self.nets = {"teacher": teacher}
      for r in ROLES:
        net = copy.deepcopy(teacher).float().requires_grad_(True)
        if self.unified:
          net.class_embedding = nn.Embedding(rows, width)
          nn.init.zeros_(net.class_embedding.weight)
        self.nets[r] = net
      self.table = None
      self.params = {r: [p for n, p in self.nets[r].named_parameters() if not n.startswith("class_embedding")]
                     for r in ROLES}
      self.full_params = {r: [self.nets[r].class_embedding.weight] if self.unified else [] for r in ROLES}
    self.forward = {r: (torch.compile(net) if compile else net) for r, net in self.nets.items()}
    self._optimizers(config)

  def _optimizers(self, config):
    o = config.optim
    _, _, student_lr, fake_lr = make_optimizers(o, config.train.num_iterations)
    self.lr = {"student": student_lr, "fake": fake_lr}
    self.clip = {"student": float(o.student_grad_clip), "fake": float(o.fake_grad_clip)}
    scales = [(re.compile(p), float(f)) for p, f in tuple(o.lr_scales)]
    table_scale = next((f for p, f in scales if p.search("class_embedding/embedding")), 1.0)
    self.optimizers, self.scales = {}, {}
    for r in ROLES:
      groups = [{"params": self.params[r]}] + ([{"params": self.full_params[r]}] if self.full_params[r] else [])
      self.scales[r] = [1.0, table_scale][:len(groups)]
      self.optimizers[r] = torch.optim.AdamW(groups, lr=0.0, betas=(o.b1, o.b2), eps=o.eps,
                                             weight_decay=o.weight_decay, foreach=True)
    self.step = 0

  def trainable(self, role: str) -> list:
    return self.params[role] + self.full_params[role]

  # -- networks ---------------------------------------------------------------------------------

  def _use(self, role: str):
    if self.lora:
      for w in self.adapted.values():
        w.role = None if role == "teacher" else role
      if self.table is not None:
        self.table.role = role if role != "teacher" else self.table.role
        self.frozen.unet.class_embedding = None if role == "teacher" else self.table
    return self.forward[role]

  def predict(self, role: str, x, t, cond, num_steps=None):
    """(x0, eps) of one network call, in float32."""
    net = self._use(role)
    extra = {}
    if "text_embeds" in cond:
      extra["added_cond_kwargs"] = {"text_embeds": cond["text_embeds"].to(self.dtype),
                                    "time_ids": cond["time_ids"].to(self.dtype)}
    if num_steps is not None and self.unified and role != "teacher":
      extra["class_labels"] = torch.full((x.shape[0],), num_steps, dtype=torch.long)
    out = net(x.to(self.dtype), t, encoder_hidden_states=cond["encoder_hidden_states"].to(self.dtype), **extra).sample
    return self.schedule.to_x0_eps(out, x, t)

  @torch.no_grad()
  def condition(self, inputs):
    """(cond, uncond) from token ids, as `diffusers_task.build_task`'s `condition`."""
    def encode(ids_list):
      outs = [enc(torch.as_tensor(np.asarray(ids), dtype=torch.long), output_hidden_states=True)
              for (_, enc), ids in zip(self.frozen.encoders, ids_list)]
      if self.frozen.kind == "sd":
        return {"encoder_hidden_states": outs[0].last_hidden_state.float()}
      pooled = next(o.text_embeds for o in outs if hasattr(o, "text_embeds") and o.text_embeds is not None)
      return {"encoder_hidden_states": torch.cat([o.hidden_states[-2] for o in outs], dim=-1).float(),
              "text_embeds": pooled.float(), "time_ids": _time_ids(len(ids_list[0]), self.resolution)}
    cond = encode([t["ids"] for t in inputs["prompt"]])
    if self.frozen.force_zeros:
      uncond = {k: (v if k == "time_ids" else torch.zeros_like(v)) for k, v in cond.items()}
    else:
      uncond = encode([t["ids"] for t in inputs["negative"]])
    return cond, uncond

  # -- the iteration -----------------------------------------------------------------------------

  def noisy_sample(self, x0_s, eps_s, d: SampleDraws):
    sch = self.schedule
    ratio, b = sch.diffusion_coefficients(d.m, d.t)
    x_m = sch.add_noise(x0_s, eps_s, d.m)
    x_t = _b(ratio, x_m) * x_m + _b(b, d.noise) * d.noise
    e = (_b(ratio * sch.s(d.m), eps_s) * eps_s + _b(b, d.noise) * d.noise) / _b(sch.s(d.t), d.noise)
    return x_t, e

  def _update(self, role: str, loss):
    opt = self.optimizers[role]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    params = self.trainable(role)
    grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    if self.clip[role] > 0 and grad_norm > self.clip[role]:
      torch._foreach_mul_([p.grad for p in params], self.clip[role] / grad_norm)
    lr = float(self.lr[role](self.step))
    for group, scale in zip(opt.param_groups, self.scales[role]):
      group["lr"] = lr * scale
    opt.step()
    return grad_norm

  def iterate(self, inputs, d: IterationDraws) -> dict:
    cfg, sch, k = self.cfg, self.schedule, d.num_steps
    cond, uncond = self.condition(inputs)
    batch = d.z.shape[0]
    taus, nexts, _ = step_grid(cfg.total_steps, k)
    with torch.no_grad():  # 1. the rollout
      x, xs, x0s, epss = d.z, [], [], []
      for j in range(k):
        x0, eps = self.predict("student", x, torch.full((batch,), int(taus[j])), cond, k)
        xs.append(x), x0s.append(x0), epss.append(eps)
        x = sch.add_noise(x0, eps, torch.full((batch,), int(nexts[j])))
    rows = torch.arange(batch)
    pick = lambda seq, j: torch.stack(seq)[j, rows]

    # 2. fake-score update
    seg = d.fake_segments
    x0_s, eps_s = pick(x0s, seg.j), pick(epss, seg.j)
    x_t, e = self.noisy_sample(x0_s, eps_s, d.fake_sample)
    t = d.fake_sample.t
    weight = torch.ones(batch)
    if cfg.min_snr_gamma > 0:
      ab = sch.alphabar(t)
      weight = weight * torch.clamp(ab / (1.0 - ab), max=cfg.min_snr_gamma)
    if cfg.importance_weighting:
      weight = weight * torch.exp(0.5 * (_mean_per_sample(d.fake_sample.noise**2) - _mean_per_sample(e**2)))
    x0_f, _ = self.predict("fake", x_t, t, cond, k)
    fake_loss = torch.mean(_mean_per_sample((x0_f - x0_s)**2) * weight)
    fake_norm = self._update("fake", fake_loss)

    # 3. generator update
    seg = d.generator_segments
    x_k = pick(xs, seg.j)
    x0_s, eps_s = self.predict("student", x_k, seg.t_k, cond, k)
    x_t, _ = self.noisy_sample(x0_s.detach(), eps_s.detach(), d.generator_sample)
    t = d.generator_sample.t
    with torch.no_grad():
      if cfg.guidance_scale == 1.0:
        x0_real, _ = self.predict("teacher", x_t, t, cond)
      else:
        both = {n: torch.cat([cond[n], uncond[n]]) for n in cond}
        x0_both, _ = self.predict("teacher", torch.cat([x_t, x_t]), torch.cat([t, t]), both)
        c, u = x0_both.chunk(2)
        x0_real = u + cfg.guidance_scale * (c - u)
      x0_fake, _ = self.predict("fake", x_t, t, cond, k)
      target = x0_s.detach() + (x0_real - x0_fake)
      normalizer = torch.clamp(_mean_per_sample((x0_s.detach() - x0_real).abs()), min=cfg.normalizer_floor)
    diff = x0_s - target
    if cfg.loss_type == "huber":
      gen_loss = torch.mean((torch.sqrt(diff**2 + cfg.huber_c**2) - cfg.huber_c) / _b(normalizer, diff))
    elif cfg.loss_type == "huber_norm":
      c = cfg.huber_norm_coef * float(np.sqrt(np.prod(diff.shape[1:])))
      gen_loss = torch.mean((torch.sqrt(torch.sum(diff**2, dim=tuple(range(1, diff.ndim))) + c**2) - c) / normalizer)
    else:
      gen_loss = torch.mean(diff**2 / _b(normalizer, diff))
    student_norm = self._update("student", gen_loss)
    self.step += 1
    return {"fake_loss": fake_loss.item(), "generator_loss": gen_loss.item(), "fake_grad_norm": fake_norm.item(),
            "student_grad_norm": student_norm.item(), "num_steps": k}

  # -- weights from and to our trees (the equal-work test) -----------------------------------------

  def load_trainable(self, role: str, params) -> None:
    """Our student or fake-score tree (a full UNet tree, or an adapter tree) into this role's tensors."""
    params = _numpy_tree(params)
    with torch.no_grad():
      if self.lora:
        pairs, full = lora_lib.split_full(params)
        for path, (a, b) in lora_lib.adapter_items(pairs).items():
          module = self.adapted[diffusers_name(path[:-1])]
          module.a[role].copy_(torch.from_numpy(np.array(a, np.float32)))
          module.b[role].copy_(torch.from_numpy(np.array(b, np.float32)))
        if self.table is not None:
          self.table.tables[role].copy_(torch.from_numpy(np.array(full[("class_embedding", "embedding")], np.float32)))
        return
      params = dict(params)
      table = params.pop("class_embedding", None)
      state = unet_state_dict_from_params(params, dict(self.frozen.unet.config))
      self.nets[role].load_state_dict({k: torch.from_numpy(np.array(v, np.float32)) for k, v in state.items()},
                                      strict=not self.unified)
      if table is not None:
        self.nets[role].class_embedding.weight.copy_(torch.from_numpy(np.array(table["embedding"], np.float32)))

  def trainable_tree(self, role: str) -> dict:
    """This role's trained tensors keyed like our trees' "/"-joined paths (for comparisons)."""
    out = {}
    if self.lora:
      for name, module in self.adapted.items():
        path = _our_path(name)
        out[path + "/kernel/a"] = module.a[role].detach().numpy().copy()
        out[path + "/kernel/b"] = module.b[role].detach().numpy().copy()
      if self.table is not None:
        out["class_embedding/embedding/full"] = self.table.tables[role].detach().numpy().copy()
      return out
    from tdm_jax.convert.unet import unet_params_from_state_dict  # pylint: disable=g-import-not-at-top
    import flax  # pylint: disable=g-import-not-at-top
    net = self.nets[role]
    state = {k: v.detach().numpy().copy() for k, v in net.state_dict().items() if not k.startswith("class_embedding")}
    flat = flax.traverse_util.flatten_dict(unet_params_from_state_dict(state, dict(self.frozen.unet.config)))
    out = {"/".join(p): np.asarray(v) for p, v in flat.items()}
    if self.unified:
      out["class_embedding/embedding"] = net.class_embedding.weight.detach().numpy().copy()
    return out


def _our_path(module_name: str) -> str:
  """Diffusers' "down_blocks.1.attentions.0...." -> our "down_blocks_1/attentions_0/..."."""
  return re.sub(r"\.(\d+)", r"_\1", module_name).replace(".", "/")


def _numpy_tree(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree.map(np.asarray, jax.device_get(tree))
