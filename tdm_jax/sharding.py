"""Device mesh and shardings: a run scales by changing `config.mesh`, not the code.

The mesh has three named axes: `data` (batch), `fsdp` (batch, and parameters sharded by
their logical axes) and `tensor` (within-layer model parallelism). Axis types are Auto so
that XLA propagates shardings through the UNet's matmuls (Explicit axes, the default of
`jax.make_mesh`, would demand annotations on every op).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

PyTree = Any
MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def make_mesh(shape: Sequence[int], devices=None) -> Mesh:
  """A (data, fsdp, tensor) mesh; one -1 entry takes the remaining devices."""
  devices = list(devices if devices is not None else jax.devices())
  shape = list(shape)
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"mesh.shape={tuple(shape)} must have one size per axis {MESH_AXES}")
  if shape.count(-1) > 1:
    raise ValueError(f"mesh.shape={tuple(shape)}: at most one axis may be -1")
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f"mesh.shape={tuple(shape)} does not divide the {len(devices)} devices")
    shape[shape.index(-1)] = len(devices) // known
  if int(np.prod(shape)) != len(devices):
    raise ValueError(f"mesh.shape={tuple(shape)} needs {int(np.prod(shape))} devices, "
                     f"{len(devices)} are present; set mesh.shape to match (one -1 fills the rest)")
  grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over data and fsdp; the rest whole."""
  return NamedSharding(mesh, P(BATCH_AXES))


def batch_size_multiple(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def shard_batch(tree: PyTree, mesh: Mesh) -> PyTree:
  """Places a host batch (the same on every process) with its leading axis split over the mesh."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda idx: np.asarray(x)[idx]),
                      tree)


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  return jax.device_put(tree, replicated(mesh))
