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


def put(tree: Any, sharding: Any) -> Any:
    """Place host values that every process holds in full (identical everywhere) with `sharding` (one sharding, or a
    tree of them). Each process supplies only its own devices' pieces, so this works across hosts too."""

    def one(x, s):
        if isinstance(x, jax.Array) and x.sharding == s:
            return x
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])

    if isinstance(sharding, jax.sharding.Sharding):
        return jax.tree.map(lambda x: one(x, sharding), tree)
    return jax.tree.map(one, tree, sharding)


def put_replicated(tree: Any, mesh: Mesh) -> Any:
    return put(tree, replicated(mesh))


def put_batch(tree: Any, mesh: Mesh) -> Any:
    """Place host arrays holding the GLOBAL batch (identical on every process) sharded over the batch axis."""
    return put(tree, batch_sharded(mesh))


def fsdp_shardings(tree: Any, mesh: Mesh) -> Any:
    """Shardings that split each frozen weight over the "fsdp" axis (its largest dimension that divides evenly) and
    replicate it over "data"; small or indivisible arrays stay replicated. XLA gathers them where they are used."""
    n = mesh.shape["fsdp"]

    def spec(x):
        dims = [d for d in np.argsort(x.shape)[::-1] if x.shape[d] % n == 0 and x.shape[d] >= n]
        if n == 1 or not dims or x.size < 1024:
            return replicated(mesh)
        axes: list[Any] = [None] * len(x.shape)
        axes[int(dims[0])] = "fsdp"
        return NamedSharding(mesh, PartitionSpec(*axes))

    return jax.tree.map(spec, tree)


def to_host(x: jax.Array) -> np.ndarray:
    """A replicated array's value on this host (works across processes, where np.asarray of a global array fails)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(x.addressable_data(0))
    return np.asarray(x)


def process_rows(global_rows: int, sharding: Any) -> tuple[int, int]:
    """The [start, stop) range of a leading axis of `global_rows` that this process's devices hold."""
    index_map = sharding.addressable_devices_indices_map((global_rows,))
    starts = [idx[0].start or 0 for idx in index_map.values()]
    stops = [global_rows if idx[0].stop is None else idx[0].stop for idx in index_map.values()]
    return min(starts), max(stops)


def initialize_distributed(coordinator: str | None, num_processes: int | None, process_id: int | None) -> None:
    """Join a multi-host run: explicit coordinator flags, or JAX's auto-detection on Cloud TPU / SLURM / MPI.

    On CPU the cross-process collectives go through gloo."""
    if jax.distributed.is_initialized():
        return
    if coordinator:
        # Harmless where another platform does the collectives; needed for CPU-only clusters and tests.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    elif _multi_host_environment():
        jax.distributed.initialize()


def _multi_host_environment() -> bool:
    import os

    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    counts = (os.environ.get("SLURM_NTASKS", "1"), os.environ.get("OMPI_COMM_WORLD_SIZE", "1"))
    return "," in hosts or any(int(c) > 1 for c in counts)
