"""Device meshes and shardings: data parallelism is `jax.jit` over a `Mesh` with `NamedSharding` (the job `pmap` once
did). The mesh has axes ("data", "fsdp"); the batch is split over both, frozen weights are replicated by default."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXES = ("data", "fsdp")


def make_mesh(devices: Sequence[jax.Device] | None = None, fsdp: int = 1) -> Mesh:
    """A 2-D mesh over `devices` (default: every device of every process): `fsdp` devices per weight shard group."""
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) % fsdp:
        raise ValueError(f"fsdp={fsdp} does not divide the {len(devices)} devices; choose a divisor of {len(devices)}")
    return Mesh(np.asarray(devices).reshape(len(devices) // fsdp, fsdp), DATA_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every device of the mesh."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXES))


def batch_size_multiple(mesh: Mesh) -> int:
    return mesh.devices.size


def put_replicated(tree: Any, mesh: Mesh) -> Any:
    return jax.device_put(tree, replicated(mesh))


def put_batch(tree: Any, mesh: Mesh) -> Any:
    """Place host arrays holding the GLOBAL batch (identical on every process) sharded over the batch axis."""
    sharding = batch_sharded(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx]), tree)
