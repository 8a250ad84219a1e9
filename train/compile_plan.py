"""Compiling the train step before training: the persistent compilation cache; plans that compile the step for a
device (this one, or a TPU slice that is not here) to report its FLOPs and memory per device and whether it fits;
and the number of concepts per step that fills a device, read off two such plans.

A plan never needs the weights' values: every argument is a `jax.ShapeDtypeStruct` carrying the sharding `tix invert`
gives the real array, so a configuration can be checked against a TPU slice from any machine where libtpu is
installed, before renting one. `tix invert` compiles its real step through `compile_step` too, so a plan and a run
report the same figures the same way.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import pickle
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from tix import disk_cache, parallel
from tix.errors import ConfigError, TixError
from tix.models import platform
from train import cost
from train.level_balance import LEVELS
from train.step import Layout, StepConfig, Tables, TrainState, optimizer_program, train_step

log = logging.getLogger(__name__)

# Small entries and quick compiles are cached too: the VAE encoder and a small model's step are what a warm start
# would otherwise still compile.
_MIN_COMPILE_SECONDS = 0.2


def cache_dir(setting: str | bool | None) -> Path | None:
    """Where `compile_cache` puts compiled programs: None (unset) is JAX's own $JAX_COMPILATION_CACHE_DIR when set
    (a folder the user gave JAX is not taken away from it), else the user cache folder; "", "off", "false" or
    "none" turn the cache off; anything else is a folder."""
    if setting is None:
        return Path(os.environ["JAX_COMPILATION_CACHE_DIR"]) if os.environ.get("JAX_COMPILATION_CACHE_DIR") \
            else disk_cache.default_folder()
    if setting is False or str(setting).strip().lower() in ("", "off", "false", "none"):
        return None
    return Path(str(setting)).expanduser()


def enable_cache(setting: str | bool | None) -> Path | None:
    """Point JAX's persistent compilation cache and tix's own (`tix.disk_cache`) at `cache_dir(setting)` (or turn
    them off), so a second run with the same shapes loads its compiled step instead of tracing and compiling it
    again. Returns the folder in use."""
    folder = cache_dir(setting)
    disk_cache.use(folder)
    from jax._src import compilation_cache

    wanted = str(folder) if folder else None
    if jax.config.jax_compilation_cache_dir != wanted:
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", wanted)
        compilation_cache.reset_cache()  # JAX opens the cache folder once; a new folder needs a fresh handle
    jax.config.update("jax_enable_compilation_cache", folder is not None)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", _MIN_COMPILE_SECONDS)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder


# ---- TPU slices that are not attached


@dataclasses.dataclass(frozen=True)
class Slice:
    """A TPU slice: its topology name for `jax.experimental.topologies` and its memory per chip."""

    name: str
    topology: str
    chips: int
    bytes_per_chip: int


_GIB = 2**30
# name prefix -> (topology kind, HBM per chip, TensorCores per chip in the name's count, mesh dimensions).
# Cloud TPU's v4/v5p names count TensorCores (2 per chip), v5e/v6e names count chips.
_GENERATIONS = {"v4": ("v4", 32 * _GIB, 2, 3), "v5p": ("v5p", 95 * _GIB, 2, 3),
                "v5litepod": ("v5e", 16 * _GIB, 1, 2), "v5e": ("v5e", 16 * _GIB, 1, 2),
                "v6e": ("v6e", 32 * _GIB, 1, 2)}
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8"}


def tpu_slice(name: str) -> Slice:
    """Parse a Cloud TPU accelerator type such as v5litepod-8, v4-8 or v6e-8."""
    generation, _, count = name.partition("-")
    known = ", ".join(f"{g}-N" for g in _GENERATIONS)
    if generation not in _GENERATIONS or not count.isdigit():
        raise ConfigError(f"--target {name!r}: not a TPU type tix knows; use one of {known} (e.g. v5litepod-8)")
    kind, memory, cores_per_chip, dims = _GENERATIONS[generation]
    chips = int(count) // cores_per_chip
    shapes = _SHAPES_3D if dims == 3 else _SHAPES_2D
    if chips not in shapes or int(count) % cores_per_chip:
        sizes = ", ".join(f"{generation}-{c * cores_per_chip}" for c in shapes)
        raise ConfigError(f"--target {name!r}: no {generation} slice of that size; use one of {sizes}")
    return Slice(name, f"{kind}:{shapes[chips]}", chips, memory)


def target_devices(target: Slice) -> list[Any]:
    """The devices of a TPU slice that is not attached, for compiling ahead of time (needs libtpu, not a TPU)."""
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise TixError(
            f"--target {target.name} compiles for a TPU slice and needs libtpu, which is not installed here; "
            f"install the JAX TPU extra matching jax {jax.__version__}: pip install 'jax[tpu]=={jax.__version__}' "
            "(no TPU is needed, only the library)"
        ) from None
    from jax.experimental import topologies

    # libtpu warns at length when it cannot find the TPU VM metadata it never needs for an ahead-of-time compile.
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    return list(topologies.get_topology_desc(target.topology, "tpu").devices)


# ---- the step's arguments from shapes alone


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The sizes a compiled step depends on: everything the concepts' files decide, without decoding them."""

    slots: int  # concept slots per step (real plus weight-0 fillers)
    sharded_tables: bool
    n_max: int  # rows per slot: a concept's vectors, and its per-image tokens if any
    images: int  # images per slot (every concept padded to the run's largest)
    prompts: int  # prompt-table rows per slot (padded likewise)
    views: int  # crops x 2 flips per image


def abstract_args(
    sd: Any, shapes: Shapes, resolution: int, optimizer: Any, mesh: Mesh
) -> tuple[TrainState, Any, Tables]:
    """(state, frozen, tables) as ShapeDtypeStructs with the dtypes and shardings `tix invert` gives the real arrays.

    Every field `tix invert` fills must be here (the variants' `n_vectors` and `init_vectors` included): a field left
    None would compile a different step than the one the run executes. tests/test_compile_plan.py checks that both
    lower to the same program."""
    repl = parallel.replicated(mesh)

    def spec(shape, dtype, sharding=repl):
        return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=sharding)

    frozen_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), sd.params)
    frozen = jax.tree.map(lambda x, s: spec(x.shape, x.dtype, s), frozen_shapes,
                          parallel.fsdp_shardings(frozen_shapes, mesh))
    vectors = tuple(spec((shapes.slots, shapes.n_max, side.width), jnp.float32) for side in sd.text)
    opt_state = jax.tree.map(lambda x: spec(x.shape, x.dtype), jax.eval_shape(optimizer.init, vectors))
    state = TrainState(vectors, opt_state, spec((), jnp.int32))
    rows = parallel.batch_sharded(mesh) if shapes.sharded_tables else repl
    k = shapes.slots
    latent = resolution // sd.vae_scale_factor
    lat = (k, shapes.images, shapes.views, latent, latent, sd.unet.config.in_channels)
    tables = Tables(
        latent_mean=spec(lat, jnp.float32, rows), latent_std=spec(lat, jnp.float32, rows),
        n_images=spec((k,), jnp.int32, rows), n_crops=spec((k,), jnp.int32, rows),
        prompt_ids=tuple(spec((k, shapes.prompts, side.max_length), jnp.int32, rows) for side in sd.text),
        n_prompts=spec((k,), jnp.int32, rows), per_image=spec((k,), jnp.bool_, rows),
        seeds=spec((k,), jnp.uint32, rows), weight=spec((k,), jnp.float32, rows),
        n_vectors=spec((k,), jnp.int32, rows),
        init_vectors=tuple(spec((k, shapes.n_max, side.width), jnp.float32, rows) for side in sd.text),
        level_loss=spec((k, LEVELS), jnp.float32, rows),
    )
    return state, frozen, tables


def step_function(sd: Any, step_cfg: StepConfig, optimizer: Any, layout: Layout) -> Any:
    """The jitted train step `tix invert` runs (state donated, outputs replicated)."""
    return jax.jit(partial(train_step, sd, step_cfg, optimizer, layout=layout), donate_argnums=(0,),
                   out_shardings=parallel.replicated(layout.mesh))


# ---- what a compiled step costs


@dataclasses.dataclass(frozen=True)
class Plan:
    """What XLA says one compiled step costs, and whether it fits the device it was compiled for."""

    device: str
    devices: int
    images_per_step: int
    flops_per_image: float
    bytes_per_device: int
    bytes_limit: int | None  # None: the runtime does not say (CPU)
    compile_seconds: float
    concepts_per_step: int | None = None  # filled in by `tix invert`, which knows the concepts

    @property
    def fits(self) -> bool | None:
        return None if self.bytes_limit is None else self.bytes_per_device <= self.bytes_limit

    def describe(self) -> str:
        limit = "no limit known" if self.bytes_limit is None else f"{self.bytes_limit / 1e9:.1f} GB available"
        verdict = {None: "", True: ": fits", False: ": does NOT fit"}[self.fits]
        k = self.concepts_per_step
        concepts = "" if k is None else f" ({k} concept{'' if k == 1 else 's'})"
        return (f"train step compiled for {self.devices} x {self.device} in {self.compile_seconds:.1f} s: "
                f"{self.images_per_step} images per step{concepts}, {self._flops()}, "
                f"{self.bytes_per_device / 1e9:.2f} GB per device ({limit}){verdict}")

    def _flops(self) -> str:
        if not math.isfinite(self.flops_per_image):
            return "FLOPs not counted here (benchmarks/train_step.py --lower-only counts them on any host)"
        return f"{self.flops_per_image / 1e9:.4g} GFLOP per image (XLA count)"  # 1380, not 1.38e+03

    def check(self) -> None:
        """Refuse a step that cannot fit before the first step, rather than failing deep inside it."""
        if self.fits is False:
            raise TixError(
                f"the train step needs {self.bytes_per_device / 1e9:.1f} GB per device but the device has "
                f"{self.bytes_limit / 1e9:.1f} GB. Lower --batch-size or --set concepts_per_step=N, use --set "
                "remat=true, --set dtype=bfloat16, a lower --resolution, or --set fsdp=N to split the frozen weights "
                "over N devices"
            )


def device_memory_limit() -> int | None:
    """Bytes one local device can hold, where the runtime says (GPU/TPU); None on CPU."""
    try:
        stats = jax.local_devices()[0].memory_stats() or {}
    except Exception:  # some backends do not implement memory_stats
        return None
    return stats.get("bytes_limit")


def step_description(sd: Any, step_cfg: StepConfig, optimizer_settings: dict[str, Any], layout: Layout) -> str:
    """Everything a compiled step depends on besides its arguments' shapes and tix's code: the models' structure
    (not their weights, which are arguments), the step's static settings, the optimizer's and the device layout."""
    text = [(side.name, repr(side.model), side.max_length, side.tokenizer.eos_token_id,
             getattr(side.tokenizer, "pad_token_id", None)) for side in sd.text]
    mesh = layout.mesh
    devices = [(d.id, d.platform, getattr(d, "device_kind", "")) for d in mesh.devices.flat]
    optimizer = sorted(optimizer_program(optimizer_settings).items())
    return repr((sd.kind, repr(sd.unet), repr(sd.vae), sd.schedule, text, step_cfg, optimizer,
                 dict(mesh.shape), devices, layout.sharded_tables, jax.process_count()))


def _signature(args: Any) -> str:
    """The arguments as the compiled program sees them: tree, shapes, dtypes and shardings."""
    leaves, tree = jax.tree.flatten(args)
    return repr((str(tree), [(tuple(np.shape(x)), str(x.dtype), str(getattr(x, "sharding", None)),
                              bool(getattr(x, "weak_type", False))) for x in leaves]))


def _loadable(mesh: Mesh) -> bool:
    # A serialised executable is loaded onto this process's devices: not for a TPU slice compiled from afar, and not
    # across hosts, where every process would have to find the same entry.
    return jax.process_count() == 1 and all(d in jax.local_devices() for d in mesh.devices.flat)


def _load_executable(name: str) -> tuple[Any, float, int] | None:
    data = disk_cache.read(name)
    if data is None:
        return None
    from jax.experimental import serialize_executable

    try:
        payload, in_tree, out_tree, flops, device_bytes = pickle.loads(data)
        return serialize_executable.deserialize_and_load(payload, in_tree, out_tree), flops, device_bytes
    except Exception as err:  # an entry from another runtime, or damaged: drop it and compile again
        log.info("compiled step %s not usable (%s); compiling it again", name, err)
        disk_cache.remove(name)
        return None


def _save_executable(name: str, compiled: Any, flops: float, device_bytes: int) -> None:
    from jax.experimental import serialize_executable

    try:
        payload, in_tree, out_tree = serialize_executable.serialize(compiled)
    except Exception as err:  # some backends cannot serialise; the next run compiles again
        log.info("compiled step not saved (%s)", err)
        return
    disk_cache.write(name, pickle.dumps((payload, in_tree, out_tree, flops, device_bytes)))


def _compile(lowered: Any) -> tuple[Any, bool]:
    """The executable, and whether XLA built it here rather than JAX loading it from its persistent cache: an
    XLA:CPU executable JAX loaded from its cache serialises without the code of its fused kernels ("Function ... not
    found" when that copy runs), so only a real compile may be kept in tix's cache."""
    hits = []

    def listener(event: str, **kwargs: Any) -> None:
        if event == "/jax/compilation_cache/cache_hits":
            hits.append(event)

    jax.monitoring.register_event_listener(listener)
    try:
        compiled = lowered.compile()
    finally:
        jax.monitoring.unregister_event_listener(listener)
    return compiled, not hits


def compile_step(step_fn: Any, args: tuple[Any, ...], images_per_step: int, mesh: Mesh,
                 bytes_limit: int | None, description: str | None = None) -> tuple[Any, Plan]:
    """Lower and compile `step_fn` for `args` (arrays or ShapeDtypeStructs); the executable and its plan. The one
    place a step is compiled, for a run and for a plan alike.

    With a `description` (`step_description`) of what `step_fn` closes over, the executable is kept in tix's disk
    cache and a later process with the same code, description and argument signature loads it without tracing the
    step (JAX's own cache skips only XLA's compile, not the seconds of tracing a UNet's forward and backward)."""
    t0 = time.perf_counter()
    name = disk_cache.key("step", description + _signature(args)) if description and _loadable(mesh) else None
    found = _load_executable(name) if name else None
    if found is not None:
        compiled, flops, device_bytes = found
    else:
        with platform.compiling_for(mesh.devices.flat[0].platform):  # a TPU slice's step takes the TPU's forms
            lowered = step_fn.lower(*args)
        compiled, built_here = _compile(lowered)
        flops = cost.flops(lowered)
        if not np.isfinite(flops) and mesh.devices.flat[0].platform == "tpu":
            # Lowered for a TPU that is not attached: XLA counts only on the compiled program, which after SPMD
            # partitioning is one device's share of the step. Not on a GPU, where the compiled count leaves out
            # cuDNN's convolutions and attention (an SD 1.5 step read 151 of its ~1670 GFLOP per image).
            flops = cost.flops(compiled) * mesh.devices.size
        device_bytes = cost.device_bytes(compiled)
        if name and built_here:  # else the next run with this step loads it from JAX's cache, after tracing it
            _save_executable(name, compiled, flops, device_bytes)
    device = mesh.devices.flat[0]
    plan = Plan(getattr(device, "device_kind", str(device.platform)), mesh.devices.size, images_per_step,
                flops / max(images_per_step, 1), device_bytes, bytes_limit, time.perf_counter() - t0)
    return compiled, plan


def plan(sd: Any, step_cfg: StepConfig, optimizer: Any, shapes: Shapes, mesh: Mesh,
         bytes_limit: int | None, optimizer_settings: dict[str, Any] | None = None) -> Plan:
    """Compile the step for `mesh` from shapes alone and say what it costs (kept in the disk cache when the
    settings `optimizer` was made from are given)."""
    layout = Layout(mesh, shapes.sharded_tables)
    step_fn = step_function(sd, step_cfg, optimizer, layout)
    args = abstract_args(sd, shapes, step_cfg.resolution, optimizer, mesh)
    images = shapes.slots * step_cfg.batch_size * step_cfg.grad_accum
    description = None if optimizer_settings is None else step_description(sd, step_cfg, optimizer_settings, layout)
    return compile_step(step_fn, args, images, mesh, bytes_limit, description)[1]


# ---- how many concepts share a step

# Without a memory limit to fill (CPU), or where every concept fits one step anyway, this many concepts share a step.
# On a CPU more concepts per step buy nothing (the step's cost grows with them), so the old fixed default stays.
DEFAULT_CONCEPTS_PER_STEP = 16
# Share of the device's memory a chosen step may use: XLA's figure leaves out the runtime's own buffers and
# fragmentation, and a step that fits with no headroom fails later on a busy device.
FILL = 0.9


def concepts_that_fit(bytes_one: int, bytes_two: int, devices: int, bytes_limit: int, most: int,
                      fill: float = FILL) -> int:
    """Concepts per step whose step stays under `fill` of the memory limit, from the bytes per device of the step
    compiled with one and with two concepts per device: a multiple of `devices` (no filler slots), at least
    `devices` (if even that does not fit, the run's fit check says so and names the remedies), at most `most`.

    Memory per device is linear in the concepts each device holds: the frozen weights are a constant, and the
    latent tables, the vectors, their optimizer moments and the activations all grow with the slots."""
    per_concept = bytes_two - bytes_one
    if per_concept <= 0:  # XLA found no growth: nothing to choose by
        return most
    per_device = 1 + math.floor((fill * bytes_limit - bytes_one) / per_concept)
    return min(devices * max(1, per_device), most)


def choose_concepts_per_step(concepts: int, devices: int, bytes_limit: int | None,
                             bytes_at: Callable[[int], int]) -> int:
    """The number of concepts one compiled step trains when the user has not said (`concepts_per_step` unset).

    `bytes_at(k)` compiles the step with k concept slots (k a multiple of `devices`, tables split over them) and
    returns its bytes per device; it is called twice, at one and at two concepts per device, only when there is a
    choice to make (a memory limit is known and there are more concepts than devices)."""
    if bytes_limit is None:
        return DEFAULT_CONCEPTS_PER_STEP
    if concepts <= devices:  # all in one step: fewer concepts per step would only leave devices idle
        return concepts
    return concepts_that_fit(bytes_at(devices), bytes_at(2 * devices), devices, bytes_limit, concepts)
