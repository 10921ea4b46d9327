"""LoRA as a transform of parameter trees: a frozen base, small trained adapters, and a merge.

Knows nothing of which model it is. A target is any 2-D leaf (a Dense kernel of shape (in, out))
whose "/"-joined path matches one of `LoraConfig.targets` (regexes, `re.search`). For each target
the adapters hold

    a: (in, r)   the "down" projection, random (normal * init_scale, init_scale defaulting to 1/r)
    b: (r, out)  the "up" projection, zeros

so that the merged kernel W + (alpha / r) * a @ b equals W at initialisation. The adapter tree is
a nested dict keyed by the same paths as the base, with the kernel leaf replaced by {"a", "b"}:

    adapters["down_blocks_1"]["attentions_0"]["transformer_blocks_0"]["attn1"]["to_q"]["kernel"]["a"]

Beside them the tree may hold parameters trained in full (PEFT's `modules_to_save`), each as a
leaf named "full" under its parameter's path: `adapters["class_embedding"]["embedding"]["full"]`
replaces (or, when the base has none, adds) `base["class_embedding"]["embedding"]`. A unified
student's step-count table is one: a new parameter, too small to need a low-rank form.

Two ways to run a model with adapters, the same function of (base, adapters):

- `merge(base, adapters, cfg)` gives a plain tree for any apply function (export, samplers);
- `adapters_applied(adapters, cfg)` is a context in which every targeted Flax `nn.Dense` adds
  `(alpha / r) * (x @ a) @ b` to its output, the adapters given to `apply` as the "lora"
  variable collection. Training uses it: no merged copy of the base is
  ever materialised, the backward pass never forms a full-size kernel gradient, and the
  base stays one shared frozen tree (an argument of the compiled step).

Differentiating with respect to the adapters alone trains only them.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Dict, List, Optional, Tuple

import contextlib

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tdm_jax.infra.errors import ConfigError

Path = Tuple[str, ...]
FULL = "full"  # the leaf name of a parameter trained in full beside the adapters

# Attention projections (to_q/to_k/to_v/to_out.0) and the feed-forward (GEGLU proj in, linear out)
# of Diffusers-style transformer blocks.
DEFAULT_TARGETS = (
    r"(^|/)attn\d*/(to_q|to_k|to_v|to_out_0)/kernel$",
    r"(^|/)ff/(net_0/proj|net_2)/kernel$",
)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Which kernels get adapters, and their size.

  rank: r, the inner dimension of a @ b.
  alpha: the merged update is scaled by alpha / rank (alpha == rank: scale 1).
  targets: regexes searched in "/"-joined paths of 2-D leaves, e.g. "down_blocks_1/.../to_q/kernel".
  init_scale: std of the normal init of `a`; None means 1 / rank.
  """
  rank: int = 4
  alpha: float = 4.0
  targets: Tuple[str, ...] = DEFAULT_TARGETS
  init_scale: Optional[float] = None

  def __post_init__(self):
    if isinstance(self.targets, str):
      raise ConfigError(f"LoraConfig.targets must be a sequence of regexes, not the string {self.targets!r}")
    object.__setattr__(self, "targets", tuple(self.targets))
    if int(self.rank) != self.rank or self.rank < 1:
      raise ConfigError(f"LoraConfig.rank must be a positive integer, got {self.rank!r}")
    if not self.targets:
      raise ConfigError("LoraConfig.targets is empty: give at least one regex over parameter paths")
    for pattern in self.targets:
      try:
        re.compile(pattern)
      except re.error as e:
        raise ConfigError(f"LoraConfig.targets: {pattern!r} is not a valid regex ({e})") from e

  @property
  def scale(self) -> float:
    return float(self.alpha) / float(self.rank)


def _unbox(x):
  return x.unbox() if isinstance(x, flax.core.meta.AxisMetadata) else x


def _flatten(tree) -> Dict[Path, Any]:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))


def target_paths(base_params, cfg: LoraConfig) -> List[Path]:
  """Sorted paths of the 2-D leaves of `base_params` that `cfg.targets` selects.

  Raises ValueError, listing some of the available 2-D paths, when nothing matches.
  """
  flat = _flatten(base_params)
  matrices = sorted(p for p, v in flat.items() if len(np.shape(_unbox(v))) == 2)
  patterns = [re.compile(t) for t in cfg.targets]
  chosen = [p for p in matrices if any(r.search("/".join(p)) for r in patterns)]
  if not chosen:
    shown = "\n  ".join("/".join(p) for p in matrices[:12])
    more = f"\n  ... and {len(matrices) - 12} more" if len(matrices) > 12 else ""
    raise ValueError(
        f"LoRA targets {list(cfg.targets)} match none of the {len(matrices)} 2-D parameters "
        f"(regexes are searched in '/'-joined paths). Some available paths:\n  {shown or '(none)'}{more}")
  return chosen


def init_adapters(key: jax.Array, base_params, cfg: LoraConfig) -> Dict[str, Any]:
  """Fresh float32 adapters for every targeted kernel: a ~ N(0, init_scale^2), b = 0.

  `base_params` may hold arrays or `jax.ShapeDtypeStruct`s (only shapes are read). The key of the
  i-th target (in sorted path order) is `fold_in(key, i)`.
  """
  flat = _flatten(base_params)
  std = (1.0 / cfg.rank) if cfg.init_scale is None else float(cfg.init_scale)
  # One vmapped draw per input width instead of one per target: the same numbers, and a program
  # of tens of draws rather than ~1,400 at SDXL's size (XLA:CPU compiles that in seconds, not minutes).
  by_width: Dict[int, List[Tuple[int, Path]]] = {}
  for i, path in enumerate(target_paths(base_params, cfg)):
    by_width.setdefault(np.shape(_unbox(flat[path]))[0], []).append((i, path))
  out = {}
  for d_in, members in by_width.items():
    keys = jnp.stack([jax.random.fold_in(key, i) for i, _ in members])
    draws = jax.vmap(lambda k, d_in=d_in: jax.random.normal(k, (d_in, cfg.rank), jnp.float32))(keys) * std
    for (_, path), a in zip(members, draws):
      out[path] = {"a": a, "b": jnp.zeros((cfg.rank, np.shape(_unbox(flat[path]))[1]), jnp.float32)}
  return flax.traverse_util.unflatten_dict(out)


def in_full(params) -> Dict[str, Any]:
  """`params` (a nested dict of arrays) as adapter-tree entries trained in full: each leaf x -> {"full": x}."""
  return jax.tree.map(lambda x: {FULL: x}, params)


def split_full(adapters) -> Tuple[Dict[str, Any], Dict[Path, Any]]:
  """(the low-rank pairs as a tree, {parameter path: value} of the leaves trained in full)."""
  flat = _flatten(adapters)
  full = {p[:-1]: v for p, v in flat.items() if p[-1] == FULL}
  pairs = flax.traverse_util.unflatten_dict({p: v for p, v in flat.items() if p[-1] != FULL})
  return pairs, full


def adapter_items(adapters) -> Dict[Path, Tuple[Any, Any]]:
  """{kernel path: (a, b)} of an adapter tree (its leaves trained in full left out)."""
  flat = _flatten(adapters)
  pairs: Dict[Path, Dict[str, Any]] = {}
  for path, value in flat.items():
    if path[-1] == FULL:
      continue
    if path[-1] not in ("a", "b"):
      raise ValueError(f"not an adapter tree: leaf {'/'.join(path)} is neither 'a', 'b' nor '{FULL}'")
    pairs.setdefault(path[:-1], {})[path[-1]] = value
  broken = sorted("/".join(p) for p, ab in pairs.items() if set(ab) != {"a", "b"})
  if broken:
    raise ValueError(f"adapters without both 'a' and 'b': {broken}")
  return {p: (ab["a"], ab["b"]) for p, ab in sorted(pairs.items())}


def with_full(base_params, adapters):
  """`base_params` with the adapter tree's leaves trained in full put in place (no kernel merged): the
  "params" the adapted model runs with under `adapters_applied`. Only dicts are rebuilt, no array copied."""
  _, full = split_full(adapters)
  if not full:
    return base_params
  flat = _flatten(base_params)
  flat.update(full)
  out = flax.traverse_util.unflatten_dict(flat)
  return flax.core.freeze(out) if isinstance(base_params, flax.core.FrozenDict) else out


def delta(a, b, cfg: LoraConfig):
  """The kernel update (alpha / r) * a @ b, shape (in, out), in float32 (or wider)."""
  dtype = jnp.promote_types(jnp.result_type(a, b), jnp.float32)
  return cfg.scale * jnp.matmul(a.astype(dtype), b.astype(dtype), precision=jax.lax.Precision.HIGHEST)


def merge(base_params, adapters, cfg: LoraConfig):
  """`base_params` with W + (alpha / r) * a @ b at every adapted kernel, cast back to W's dtype, and
  the leaves trained in full put in place (as `with_full`).

  Pure and jittable; the structure (and any flax partitioning boxes) of `base_params` is kept.
  """
  items = adapter_items(adapters)
  flat = _flatten(with_full(base_params, adapters))
  missing = sorted("/".join(p) for p in items if p not in flat)
  if missing:
    raise ValueError(f"adapters for kernels the base does not have: {missing[:8]}")
  for path, (a, b) in items.items():
    leaf = flat[path]
    w = _unbox(leaf)
    if tuple(np.shape(w)) != (np.shape(a)[0], np.shape(b)[1]) or np.shape(a)[1] != np.shape(b)[0]:
      raise ValueError(f"adapter at {'/'.join(path)}: a {np.shape(a)} @ b {np.shape(b)} does not fit "
                       f"the kernel {np.shape(w)}")
    sum_dtype = jnp.promote_types(w.dtype, jnp.float32)
    merged = (w.astype(sum_dtype) + delta(a, b, cfg).astype(sum_dtype)).astype(w.dtype)
    flat[path] = leaf.replace_boxed(merged) if isinstance(leaf, flax.core.meta.AxisMetadata) else merged
  out = flax.traverse_util.unflatten_dict(flat)
  return flax.core.freeze(out) if isinstance(base_params, flax.core.FrozenDict) else out


def count(adapters) -> int:
  """Number of scalars in an adapter tree."""
  return int(sum(np.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(adapters)))


def adapters_applied(adapters, cfg: LoraConfig):
  """A context in which Flax Dense layers with an adapter compute x W + b0 + (alpha / r) (x a) b.

  The adapters enter the model as its "lora" variable collection, beside the frozen "params":
  `model.apply({"params": base, "lora": adapters}, ...)` inside this context. A Dense layer finds
  its adapter at its own path (`down_blocks_1/.../to_q` holds {"kernel": {"a", "b"}}), so the
  adapters must come from `init_adapters` over the model's own parameter tree. Being variables,
  not values the interceptor closes over, they pass through Flax's lifted transforms (remat,
  custom VJPs) like the weights do. The low-rank path runs in the layer's compute dtype. Raises
  ValueError after the call if an adapter matched no layer (a tree of another model).
  """
  expected = {path[:-1] for path in adapter_items(adapters)}
  used = set()

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, nn.Dense):
      return out
    if not module.has_variable("lora", "kernel"):
      return out
    used.add(tuple(module.path))
    ab = module.get_variable("lora", "kernel")
    x = jnp.asarray(args[0]).astype(out.dtype)
    low = jnp.matmul(jnp.matmul(x, ab["a"].astype(out.dtype)), ab["b"].astype(out.dtype))
    return out + jnp.asarray(cfg.scale, out.dtype) * low

  @contextlib.contextmanager
  def context():
    with nn.intercept_methods(interceptor):
      yield
    unused = sorted("/".join(p) for p in expected if p not in used)
    if unused:
      raise ConfigError(f"{len(unused)} LoRA adapters matched no Dense layer of the model, e.g. {unused[:4]}; "
                        f"the adapters were made for another model's parameter tree")

  return context()


def adapter_axes(base_axes, adapters):
  """Logical axis names of an adapter tree from its base kernels' names: a (in, -), b (-, out); a
  leaf trained in full takes its parameter's names.

  `base_axes` is the base's tree of logical-name tuples (see `sharding.logical_axes`; it must name
  the parameters trained in full that the base lacks), so adapters shard along the same model
  dimensions as the kernels they adapt.
  """
  flat_axes = flax.traverse_util.flatten_dict(flax.core.unfreeze(base_axes), is_leaf=lambda _, v: v is None or isinstance(v, tuple))
  out = {path + (FULL,): flat_axes.get(path) for path in split_full(adapters)[1]}
  for path in adapter_items(adapters):
    names = flat_axes.get(path)
    names = tuple(names) if names is not None and len(names) == 2 else (None, None)
    out[path + ("a",)] = (names[0], None)
    out[path + ("b",)] = (None, names[1])
  return flax.traverse_util.unflatten_dict(out)
