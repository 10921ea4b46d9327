"""Device mesh and shardings: a run scales by changing `config.mesh`, not the code.

The mesh has three named axes: `data` (batch), `fsdp` (batch, and parameters sharded by
their logical axes) and `tensor` (within-layer model parallelism). Axis types are Auto so
that XLA propagates shardings through the UNet's matmuls (Explicit axes, the default of
`jax.make_mesh`, would demand annotations on every op).

Parameters are placed by logical axis names (the models annotate every weight, e.g. a
cross-attention key kernel is ("cross_embed", "heads")) and `mesh.rules`, pairs
(logical name, mesh axis or None) tried in order as Flax's `logical_to_mesh_axes` does.
Two guards then apply, in the spirit of big_vision's FSDP strategy: a dimension that the
mesh axis does not divide stays whole, and every leaf of at least `min_size` elements that
the rules left unsplit over `fsdp` is split over `fsdp` on its largest free dimension that
`fsdp` divides. Leaves below `min_size` (norm scales, biases, counts) stay replicated.

Activations stay split over the batch: every dense and conv output of the models is constrained
to it (`constrain_batch`), so XLA gathers each fsdp-split weight where it is used (FSDP) rather
than the activations.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np

from tdm_jax.infra.errors import ConfigError
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

PyTree = Any
MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
FSDP = "fsdp"

# Logical axis name -> mesh axis. Model dimensions ("embed", the conv output channels, the
# cross-attention context) go to fsdp; attention heads, MLP width and the vocabulary to tensor
# (Megatron-style splits inside attention and feed-forward). Convolutions are not split over
# tensor: a channel split would follow the activations into the UNet's skip concatenations.
# Anything unnamed or unlisted is left to the fsdp guard.
DEFAULT_RULES = (
    ("batch", BATCH_AXES),
    ("embed", FSDP),
    ("cross_embed", FSDP),
    ("conv_out", FSDP),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("norm", None),
    ("conv_height", None),
    ("conv_width", None),
)
DEFAULT_MIN_SIZE = 2 ** 14  # elements; smaller leaves are replicated (cheap, and no tiny collectives)


def make_mesh(shape: Sequence[int], devices=None) -> Mesh:
  """A (data, fsdp, tensor) mesh; one -1 entry takes the remaining devices."""
  devices = list(devices if devices is not None else jax.devices())
  shape = list(shape)
  if len(shape) != len(MESH_AXES):
    raise ConfigError(f"mesh.shape={tuple(shape)} must have one size per axis {MESH_AXES}")
  if shape.count(-1) > 1:
    raise ConfigError(f"mesh.shape={tuple(shape)}: at most one axis may be -1")
  if any(s == 0 or s < -1 for s in shape):
    raise ConfigError(f"mesh.shape={tuple(shape)}: sizes must be positive (or one -1)")
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if len(devices) % known:
      raise ConfigError(f"mesh.shape={tuple(shape)} does not divide the {len(devices)} devices; "
                        f"make the product of the fixed sizes divide {len(devices)}")
    shape[shape.index(-1)] = len(devices) // known
  if int(np.prod(shape)) != len(devices):
    raise ConfigError(f"mesh.shape={tuple(shape)} needs {int(np.prod(shape))} devices, "
                      f"{len(devices)} are present; set mesh.shape to match (one -1 fills the rest)")
  grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def rules_from_config(rules) -> tuple:
  """`mesh.rules` as a tuple of (logical name, mesh axis | tuple of axes | None), validated."""
  out = []
  for rule in rules:
    if len(rule) != 2 or not isinstance(rule[0], str):
      raise ConfigError(f"mesh.rules entry {rule!r} must be a pair (logical axis name, mesh axis or None)")
    name, target = rule
    targets = () if target is None else (tuple(target) if isinstance(target, (list, tuple)) else (target,))
    unknown = [t for t in targets if t not in MESH_AXES]
    if unknown:
      raise ConfigError(f"mesh.rules maps {name!r} to {unknown}, not mesh axes {MESH_AXES}")
    out.append((name, None if target is None else (targets[0] if len(targets) == 1 else targets)))
  return tuple(out)


def _axis_size(mesh: Mesh, axes) -> int:
  if axes is None:
    return 1
  axes = axes if isinstance(axes, tuple) else (axes,)
  return int(np.prod([mesh.shape[a] for a in axes]))


def _uses(entry, axis: str) -> bool:
  return entry == axis or (isinstance(entry, tuple) and axis in entry)


def spec_for(shape: Sequence[int], logical: Optional[Sequence[Optional[str]]], mesh: Mesh, rules,
             min_size: int = DEFAULT_MIN_SIZE) -> P:
  """The PartitionSpec of one parameter of `shape` named by `logical` (None: no names)."""
  shape = tuple(shape)
  if int(np.prod(shape, dtype=np.int64)) < min_size or not shape:
    return P()
  if logical is not None and len(logical) == len(shape):
    entries = list(nn.logical_to_mesh_axes(tuple(logical), rules))
  else:
    entries = [None] * len(shape)
  # Axes of size 1 split nothing; an axis that does not divide its dimension leaves it whole.
  entries = [e if e is not None and _axis_size(mesh, e) > 1 and dim % _axis_size(mesh, e) == 0 else None
             for e, dim in zip(entries, shape)]
  fsdp = mesh.shape[FSDP]
  if fsdp > 1 and not any(_uses(e, FSDP) for e in entries):
    free = [i for i, (e, dim) in enumerate(zip(entries, shape)) if e is None and dim % fsdp == 0]
    shared = [i for i, (e, dim) in enumerate(zip(entries, shape))
              if e is not None and dim % (_axis_size(mesh, e) * fsdp) == 0]
    if free:
      entries[max(free, key=lambda i: (shape[i], i))] = FSDP
    elif shared:  # e.g. a bias split over tensor: split it over (tensor, fsdp)
      i = max(shared, key=lambda i: (shape[i], i))
      entries[i] = (entries[i] if isinstance(entries[i], tuple) else (entries[i],)) + (FSDP,)
  return P(*entries)


def logical_axes(boxed: PyTree) -> PyTree:
  """The tree of logical axis names (tuples) of a boxed (`nn.with_logical_partitioning`) tree.

  Unannotated leaves get None. The structure is that of the unboxed tree.
  """
  is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
  return jax.tree.map(lambda x: tuple(x.names) if is_box(x) else None, boxed, is_leaf=is_box)


def tree_shardings(abstract: PyTree, axes: Optional[PyTree], mesh: Mesh, rules,
                   min_size: int = DEFAULT_MIN_SIZE) -> PyTree:
  """NamedShardings for every leaf of `abstract` (arrays or ShapeDtypeStructs).

  `axes` is a tree of the same structure whose leaves are tuples of logical names or None
  (None as a whole: no names anywhere, only the fsdp guard applies).
  """
  if axes is None:
    return jax.tree.map(lambda a: NamedSharding(mesh, spec_for(a.shape, None, mesh, rules, min_size)), abstract)
  flat, treedef = jax.tree.flatten(abstract)
  names = treedef.flatten_up_to(axes)
  return treedef.unflatten([NamedSharding(mesh, spec_for(a.shape, n, mesh, rules, min_size))
                            for a, n in zip(flat, names)])


def with_shardings(abstract: PyTree, shardings: PyTree) -> PyTree:
  """ShapeDtypeStructs carrying the given shardings (to lower, compile or restore without data)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def constrain_batch(x: jax.Array) -> jax.Array:
  """`x` with its leading (batch) axis split over (data, fsdp) of the current mesh, whole along the rest.

  The models apply it to every dense and conv output. Without it XLA's partitioner, seeing a
  weight split over `fsdp` on its input dimension, may gather the activations over the batch
  and all-reduce partial products instead of gathering the weight: the SDXL step then held
  full-batch activations on every device. No-op outside a mesh, or when the batch axes do not
  divide the leading axis.

  The other axes are pinned whole, not left UNCONSTRAINED: on a mesh with data, fsdp and tensor
  all > 1, e.g. (2, 2, 2), XLA partitioned UNCONSTRAINED transformer-block outputs wrongly (the tiny
  SDXL UNet's forward off by 1.4 at outputs of size 2.3; `tests/test_sdxl_scale.py` runs that mesh).
  Whole is the same program wherever tensor = 1; with tensor > 1 it gathers each dense and conv
  output over `tensor`.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names) or not x.ndim:
    return x
  size = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
  if size == 1 or x.shape[0] % size:
    return x
  return jax.lax.with_sharding_constraint(x, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over data and fsdp; the rest whole."""
  return NamedSharding(mesh, P(BATCH_AXES))


def batch_size_multiple(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def process_rows(mesh: Mesh, batch_size: int) -> np.ndarray:
  """The rows of a global batch of `batch_size` that this process's devices hold (sorted)."""
  index_map = batch_sharding(mesh).addressable_devices_indices_map((batch_size,))
  rows = set()
  for index in index_map.values():
    rows.update(range(batch_size)[index[0]])
  return np.asarray(sorted(rows), np.int64)


def global_batch(local: PyTree, mesh: Mesh, batch_size: int, rows: np.ndarray) -> PyTree:
  """Global arrays split over the batch axes, built from this process's rows only.

  `local` holds the rows `rows` (as `process_rows` gives them) of a global batch of `batch_size`;
  no process needs the others' rows.
  """
  sharding = batch_sharding(mesh)
  position = {int(r): i for i, r in enumerate(rows)}

  def place(x):
    x = np.asarray(x)
    if x.shape[0] != len(rows):
      raise ValueError(f"a batch leaf has {x.shape[0]} rows, this process holds {len(rows)}")
    def shard(index):
      wanted = range(batch_size)[index[0]]
      return x[[position[r] for r in wanted]][(slice(None),) + tuple(index[1:])]
    return jax.make_array_from_callback((batch_size,) + x.shape[1:], sharding, shard)

  return jax.tree.map(place, local)


def shard_batch(tree: PyTree, mesh: Mesh) -> PyTree:
  """Places a host batch (the same on every process) with its leading axis split over the mesh."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda idx: np.asarray(x)[idx]),
                      tree)


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  return jax.device_put(tree, replicated(mesh))


def shard_bytes(abstract: PyTree) -> int:
  """Bytes one device holds of a tree of sharded arrays or ShapeDtypeStructs (the largest shard)."""
  total = 0
  for leaf in jax.tree.leaves(abstract):
    shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) is not None else leaf.shape
    total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
  return total
