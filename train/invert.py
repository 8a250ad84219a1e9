"""`tix invert`: learn one pseudo-word per concept against a frozen Stable Diffusion.

The edges live here (files, progress, signals, checkpoints); the math is `train.step`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

import tix
from tix import fs, library, parallel, templates
from tix.embedding_files import output_stems
from tix.errors import ConfigError, TixError
from tix.models.clip import token_table
from tix.pipeline import StableDiffusion
from train import compile_plan, data, level_balance
from train.checkpoint import Checkpoints
from train.config import TrainConfig
from train.loop import Hook, run_steps
from train.report import MetricsLog, grid, loss_curve, write_html
from train.step import Layout, StepConfig, TrainState, make_optimizer
from train.stop import Stopped, StopRequests
from train.tables import Prepared, initial_vectors, step_shapes, wave_tables

log = logging.getLogger("tix")


@dataclasses.dataclass
class Result:
    out: Path
    state: TrainState  # of the last wave
    tokens: list[str]
    vectors: dict[str, dict[str, np.ndarray]]  # token -> text encoder name -> [n, D]
    steps: int
    final_loss: float
    compile_seconds: float
    images_per_second: float
    images_read: list[Path]  # the image files this process decoded (its share of the data)
    norms: dict[str, float] = dataclasses.field(default_factory=dict)  # token -> norm_vs_words
    waves: int = 1  # groups of concepts_per_step tokens trained one after another


# Everything a run writes in its folder besides config.yaml: what --overwrite clears.
RUN_OUTPUTS = ("checkpoints", "validation", "tensorboard", "tokens", "embeddings", "learned_embeds.safetensors",
               "metrics.jsonl", "loss.png", "report.html")
PATH_FIELDS = ("model", "images", "concepts", "init_from")


def _check_out(cfg: TrainConfig) -> tuple[fs.Path, TrainConfig]:
    """The run folder, once it is clear this run may use it. Nothing is written: a run refused later (bad images,
    a wrong initializer word) leaves the folder as it was, and the same command can be run again. Returns the
    folder and `cfg` as the run continues: a resumed run keeps the concepts per step it chose when it started."""
    out = fs.path(cfg.out)  # local or gs://: every write under it goes through tix.fs or orbax
    fs.check_supported(out, checkpoints=True)
    saved = out / "config.yaml"
    if fs.exists(saved):
        if cfg.overwrite:
            return out, cfg
        if not cfg.resume:
            raise ConfigError(
                f"{out} already holds a run; pass --resume to continue it, --overwrite to start it again, "
                "or choose another --out"
            )
        started = TrainConfig.from_yaml(fs.read_text(saved))
        if cfg.concepts_per_step is None:
            # Left to tix: the waves (and so the checkpoints) depend on the number chosen at the start, which
            # another device or a changed memory estimate could choose differently now.
            cfg = dataclasses.replace(cfg, concepts_per_step=started.concepts_per_step)
        old, new = _comparable(started), _comparable(cfg)
        if old.identity() != new.identity():
            ignored = ("resume", "overwrite", "steps")
            changed = [f.name for f in dataclasses.fields(TrainConfig)
                       if getattr(old, f.name) != getattr(new, f.name) and f.name not in ignored]
            raise ConfigError(
                f"{out} was trained with a different config (changed: {', '.join(changed)}); resume with the "
                "same settings, or use --overwrite / another --out"
            )
    elif cfg.resume:
        raise ConfigError(f"--resume: {out} holds no run to resume (no config.yaml)")
    return out, cfg


def _comparable(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with its input paths resolved, so that one folder spelled two ways (relative and absolute, with a
    trailing slash, through a symlink) is the same run."""
    return dataclasses.replace(cfg, **{name: _resolved(getattr(cfg, name)) for name in PATH_FIELDS})


def _resolved(p: str | None) -> str | None:
    if p is None or fs.is_remote(p):
        return p.rstrip("/") if p else p
    local = Path(p).expanduser()
    return str(local.resolve()) if local.exists() else p  # not a path: a Hub id or "toyworld"


def _claim_out(cfg: TrainConfig, out: fs.Path) -> None:
    """Called once the run can start: clear what an overwritten run wrote, then record this run's config. (Every
    host has checked the folder before the first one writes to it.)"""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("tix: run folder checked")
    out.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        if cfg.overwrite:
            for name in RUN_OUTPUTS:
                if fs.is_dir(out / name):
                    fs.rmtree(out / name)
                else:
                    (out / name).unlink(missing_ok=True)
        (out / "config.yaml").write_text(dataclasses.replace(cfg, resume=False, overwrite=False).to_yaml())
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("tix: run folder ready")


def init_vectors(sd: StableDiffusion, init: str, n: int) -> list[np.ndarray]:
    """Per text encoder, [n, D] rows of the initializer word(s): cycled over the n vectors when there are fewer words
    than vectors; with more, the words are split in n runs and each vector starts at the mean of its run's rows
    ("yellow dotted triangle" into one vector), so a concept that several words describe can start from all of them."""
    words = init.split()
    groups = [list(g) for g in np.array_split(np.arange(len(words)), n)] if len(words) > n else \
        [[j % len(words)] for j in range(n)]
    out = []
    for side in sd.text:
        ids = [_single_token(side, word) for word in words]
        table = np.asarray(token_table(sd.params[side.name]), np.float32)
        out.append(np.stack([table[[ids[i] for i in group]].mean(axis=0) for group in groups]))
    return out


def _single_token(side, word: str) -> int:
    pieces = side.tokenizer(word, add_special_tokens=False).input_ids
    if len(pieces) != 1 or pieces[0] >= side.vocab_size:
        raise ConfigError(
            f"initializer word {word!r} is not a single token of the {side.name} vocabulary (it splits into "
            f"{len(pieces)} pieces); choose a common word that describes the concept, e.g. 'cat' or 'toy'"
        )
    return pieces[0]


def word_norms(sd: StableDiffusion) -> tuple[float, ...]:
    """Per text encoder, the median L2 norm of its token table's rows: the scale of an ordinary word."""
    return tuple(float(np.median(np.linalg.norm(np.asarray(token_table(sd.params[side.name]), np.float32), axis=-1)))
                 for side in sd.text)


def norm_vs_words(vectors: list[np.ndarray], words: tuple[float, ...]) -> float:
    """A token's mean vector norm over an ordinary word's, averaged over the text encoders (`vectors`: [n, D] per
    encoder). Learned vectors far above 1 still draw the concept on the model they were learned on, but weigh more
    than any word in a prompt they share, and merge badly with other tokens."""
    return float(np.mean([np.linalg.norm(v, axis=-1).mean() / w for v, w in zip(vectors, words, strict=True)]))


def _check_resolution(sd: StableDiffusion, resolution: int) -> None:
    multiple = sd.vae_scale_factor * 2 ** (len(sd.unet.config.block_out_channels) - 1)
    if resolution % multiple:
        lower = resolution // multiple * multiple or multiple
        raise ConfigError(f"resolution {resolution} must be a multiple of {multiple} for this model; "
                          f"try {lower} or {lower + multiple}")


def _concept_seed(run_seed: int, token: str) -> int:
    """A concept's random stream depends on the run seed and its token only, not on its neighbours in the run."""
    import zlib

    return (run_seed * 1_000_003 + zlib.crc32(token.encode())) % (2**32)


def prepare_concepts(sd: StableDiffusion, cfg: TrainConfig) -> list[Prepared]:
    """Resolve every concept and register its token (with its initial vectors) on every process."""
    specs = data.concept_specs(cfg)
    tokens = [s.token for s in specs]
    if len(set(tokens)) != len(tokens):
        raise ConfigError(f"concept tokens must be unique, got {tokens}")
    starts = _init_from(sd, cfg, tokens)
    prepared = []
    for spec in specs:
        concept = data.resolve_concept(spec, cfg)
        if not concept.images:
            raise TixError(
                f"{concept.token}: no jpg, png or webp image in {spec.images}; add 3-5 images of the concept"
            )
        if concept.token in starts:
            init = [starts[concept.token].vectors[side.name] for side in sd.text]
            concept = dataclasses.replace(concept, vectors=init[0].shape[0])
        else:
            init = init_vectors(sd, concept.init, concept.vectors)
        sd.add_tokens(concept.token, init)
        data.check_prompts_fit(sd, concept)
        if cfg.per_image_tokens:
            # Training devices only: registered after the token, so its rows and theirs are one block of ids; each
            # starts from the token's first vector; never exported.
            for name in data.image_tokens(concept.token, len(concept.images)):
                sd.add_tokens(name, [v[:1] for v in init])
            init = [np.concatenate([v, np.repeat(v[:1], len(concept.images), axis=0)]) for v in init]
        prepared.append(Prepared(concept, init, _concept_seed(cfg.seed, concept.token)))
    return prepared


def _init_from(sd: StableDiffusion, cfg: TrainConfig, tokens: list[str]) -> dict[str, Any]:
    """Learned vectors to start from (`--init-from FILE`): matched by token; a file with one concept starts a
    one-concept run whatever its token is called."""
    if not cfg.init_from:
        return {}
    from tix import embedding_files

    found = embedding_files.read(cfg.init_from)
    if len(found) == 1 and len(tokens) == 1:
        found = [embedding_files.Concept(tokens[0], found[0].vectors)]
    starts = {c.token: c for c in found if c.token in tokens}
    if not starts:
        raise ConfigError(f"--init-from {cfg.init_from}: holds {[c.token for c in found]}, none of this run's "
                          f"tokens {tokens}")
    for concept in starts.values():
        embedding_files.check_compatible(concept, {s.name: s.width for s in sd.text}, sd.kind)
    return starts


def _set_token_vectors(sd: StableDiffusion, wave: list[Prepared], vectors: tuple[np.ndarray, ...]) -> None:
    """Copy a wave's current vectors into the model's placeholder rows (for validation and the final export)."""
    for e, side in enumerate(sd.text):
        for s, p in enumerate(wave):
            start = side.added.index(p.concept.token)
            side.extra[start:start + p.concept.vectors] = vectors[e][s, :p.concept.vectors]


def validation_prompts(cfg: TrainConfig, style: bool) -> tuple[str, ...]:
    if cfg.validation_prompts:
        return tuple(cfg.validation_prompts)
    return templates.VALIDATION_STYLE if style else templates.VALIDATION_OBJECT


def _validate(
    sd: StableDiffusion, cfg: TrainConfig, out: Path, step: int, wave: list[Prepared], resolution: int
) -> None:
    folder = out / "validation" / f"step-{step:06d}"
    folder.mkdir(parents=True, exist_ok=True)
    from tix.embedding_files import safe_stem

    for p in wave:
        prompts = validation_prompts(cfg, p.concept.style)
        batch = [t.format(p.concept.token) for _ in range(cfg.validation_seeds) for t in prompts]
        images = sd.generate(batch, steps=cfg.validation_steps, guidance=cfg.validation_guidance,
                             sampler=cfg.validation_sampler, seed=cfg.seed, size=resolution)
        fs.save_image(grid(images, len(prompts)), folder / f"{safe_stem(p.concept.token)}.png")


def _load(cfg: TrainConfig, sd: StableDiffusion | None) -> tuple[StableDiffusion, int]:
    """The model as the step uses it (remat applied) and the training resolution, checked."""
    if sd is None:
        sd = tix.load(cfg.model, cfg.dtype, compute_dtype=cfg.compute_dtype)
    if cfg.remat:
        sd = dataclasses.replace(sd, unet=sd.unet.clone(remat=True))
    resolution = cfg.resolution or sd.default_size
    _check_resolution(sd, resolution)
    return sd, resolution


def _optimizer_settings(cfg: TrainConfig) -> dict[str, Any]:
    """`make_optimizer`'s arguments for this run."""
    lr = cfg.lr * (cfg.batch_size * cfg.grad_accum if cfg.scale_lr else 1)
    return dict(lr=lr, steps=cfg.steps, schedule=cfg.lr_schedule, warmup=cfg.warmup_steps,
                weight_decay=cfg.weight_decay, b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps,
                max_grad_norm=cfg.max_grad_norm)


def _step_settings(cfg: TrainConfig, resolution: int) -> tuple[StepConfig, Any]:
    """The compiled step's static settings and its optimizer."""
    optimizer = make_optimizer(**_optimizer_settings(cfg))
    step_cfg = StepConfig(
        cfg.batch_size, cfg.grad_accum, cfg.flip_p, cfg.min_snr_gamma, cfg.max_grad_norm, resolution,
        init_reg=cfg.init_reg, progressive_every=cfg.progressive_every,
        per_image_mix=cfg.per_image_mix if cfg.per_image_tokens else 0.0, timestep_bias=cfg.timestep_bias,
        balance_levels=cfg.balance_noise_levels,
    )
    return step_cfg, optimizer


def _planner(cfg: TrainConfig, sd: StableDiffusion, prepared: list[Prepared], step_cfg: StepConfig, optimizer: Any,
             mesh: Any, bytes_limit: int | None) -> Callable[[int], compile_plan.Plan]:
    """plan_at(k): the plan of the step that trains k concepts at a time, compiled from shapes (each size once)."""
    plans: dict[compile_plan.Shapes, compile_plan.Plan] = {}

    def plan_at(k: int) -> compile_plan.Plan:
        shapes = step_shapes(cfg, prepared, k, mesh.devices.size)
        if shapes not in plans:
            plans[shapes] = compile_plan.plan(sd, step_cfg, optimizer, shapes, mesh, bytes_limit,
                                              _optimizer_settings(cfg))
        return plans[shapes]

    return plan_at


def concepts_per_step(cfg: TrainConfig, concepts: int, devices: int, bytes_limit: int | None,
                      plan_at: Callable[[int], compile_plan.Plan]) -> int:
    """`concepts_per_step` as set, or else as many concepts as fill the device's memory (the step compiled from
    shapes at one and two concepts per device; `compile_plan.choose_concepts_per_step`).

    Only the concepts per step are chosen, never the batch: the batch is a hyperparameter of the optimisation (the
    learning rate scales with it, and each concept's gradient averages over it), so a bigger device would learn a
    different word. More concepts per step change nothing a concept learns (each has its own draws, loss and
    clipping), only how many train at once."""
    if cfg.concepts_per_step is not None:
        return cfg.concepts_per_step
    chosen = compile_plan.choose_concepts_per_step(concepts, devices, bytes_limit,
                                                   lambda k: plan_at(k).bytes_per_device)
    if bytes_limit is not None and concepts > devices and jax.process_index() == 0:
        log.info("concepts per step: %d of %d, to stay under %.0f%% of the %.1f GB per device (one per device: "
                 "%.2f GB, two: %.2f GB); --set concepts_per_step=N to choose", min(chosen, concepts), concepts,
                 100 * compile_plan.FILL, bytes_limit / 1e9, plan_at(devices).bytes_per_device / 1e9,
                 plan_at(2 * devices).bytes_per_device / 1e9)
    return chosen


def plan(cfg: TrainConfig, sd: StableDiffusion | None = None, target: str | None = None) -> compile_plan.Plan:
    """`tix invert --compile-only [--target TPU]`: compile the run's step for this host's devices or a TPU slice
    from shapes alone and say what it costs, without decoding an image, writing to the run folder or training."""
    cfg.check()
    compile_plan.enable_cache(cfg.compile_cache)
    if target:  # before loading the model: a wrong name or a missing libtpu is reported at once
        tpu = compile_plan.tpu_slice(target)
        mesh, limit = parallel.make_mesh(compile_plan.target_devices(tpu), fsdp=cfg.fsdp), tpu.bytes_per_chip
    else:
        mesh, limit = parallel.make_mesh(fsdp=cfg.fsdp), compile_plan.device_memory_limit()
    sd, resolution = _load(cfg, sd)
    prepared = prepare_concepts(sd, cfg)
    step_cfg, optimizer = _step_settings(cfg, resolution)
    _warn_unreached_vectors(cfg, prepared)
    plan_at = _planner(cfg, sd, prepared, step_cfg, optimizer, mesh, limit)
    k = min(concepts_per_step(cfg, len(prepared), mesh.devices.size, limit, plan_at), len(prepared))
    return dataclasses.replace(plan_at(k), concepts_per_step=k)


def run(cfg: TrainConfig, sd: StableDiffusion | None = None, *, progress: bool = True) -> Result:
    """Train every concept of `cfg`; returns the learned vectors. Writes checkpoints, metrics and exports to cfg.out."""
    cfg.check()
    compile_plan.enable_cache(cfg.compile_cache)
    parallel.initialize_distributed(cfg.coordinator_address, cfg.num_processes, cfg.process_id)
    out, cfg = _check_out(cfg)
    is_main = jax.process_index() == 0
    sd, resolution = _load(cfg, sd)
    prepared = prepare_concepts(sd, cfg)
    mesh = parallel.make_mesh(fsdp=cfg.fsdp)
    limit = compile_plan.device_memory_limit()
    step_cfg, optimizer = _step_settings(cfg, resolution)
    _warn_unreached_vectors(cfg, prepared)
    # Chosen before the run folder is claimed: config.yaml records the number, which --resume keeps.
    plan_at = _planner(cfg, sd, prepared, step_cfg, optimizer, mesh, limit)
    cfg = dataclasses.replace(cfg, concepts_per_step=concepts_per_step(cfg, len(prepared), mesh.devices.size, limit,
                                                                       plan_at))
    _claim_out(cfg, out)

    wave_size = min(cfg.concepts_per_step, len(prepared))
    shapes = step_shapes(cfg, prepared, wave_size, mesh.devices.size)
    frozen = place_frozen(sd, mesh)
    layout = Layout(mesh, shapes.sharded_tables)
    step_fn = compile_plan.step_function(sd, step_cfg, optimizer, layout)
    step_key = compile_plan.step_description(sd, step_cfg, _optimizer_settings(cfg), layout)
    if step_cfg.balance_levels:
        measure_levels = level_balance.reference_function(sd, step_cfg, layout, table_sharding(mesh, shapes))
    waves = [prepared[i:i + wave_size] for i in range(0, len(prepared), wave_size)]
    metrics_log = MetricsLog(out, enabled=is_main)
    compiled = None
    compile_seconds = 0.0
    final_loss = math.nan
    rates, files_read = [], []
    requests = StopRequests(mesh)
    context = _RunContext(cfg, sd, out, resolution, metrics_log, progress and is_main, requests, word_norms(sd))
    with requests, contextlib.closing(metrics_log):
        for w, wave in enumerate(waves):
            state, tables, files = place_wave(sd, cfg, wave, shapes, resolution, mesh, optimizer)
            if step_cfg.balance_levels:  # from the initial vectors, before any checkpoint is restored
                tables = tables._replace(level_loss=measure_levels(frozen, tables, state.vectors))
            files_read += files
            ckpt = Checkpoints(out / "checkpoints" / f"wave-{w:03d}", cfg.keep_checkpoints)
            tokens = [p.concept.token for p in wave]
            restored = ckpt.restore_latest(state) if cfg.resume else None
            if restored is not None:
                state, meta = restored
                if meta.get("tokens") != tokens:
                    raise ConfigError(f"checkpoint of wave {w} holds {meta.get('tokens')}, expected {tokens}")
                log.info("resumed wave %d at step %d", w, int(parallel.to_host(state.step)))
            if compiled is None:
                compiled, step_plan = compile_plan.compile_step(
                    step_fn, (state, frozen, tables), shapes.slots * cfg.batch_size * cfg.grad_accum, mesh, limit,
                    step_key)
                step_plan = dataclasses.replace(step_plan, concepts_per_step=wave_size)
                compile_seconds = step_plan.compile_seconds
                if is_main:
                    log.info("%s", step_plan.describe())
                step_plan.check()
            state, final_loss, rate = _train_wave(
                context, compiled, state, frozen, tables, wave, ckpt,
                f"wave {w + 1}/{len(waves)}" if len(waves) > 1 else "",
            )
            rates.append(rate)
            _set_token_vectors(sd, wave, tuple(parallel.to_host(v) for v in state.vectors))
            ckpt.close()
    learned = {
        p.concept.token: {side.name: np.array(side.extra[side.added.index(p.concept.token):][:p.concept.vectors])
                          for side in sd.text}
        for p in prepared
    }
    library.add_run(out / "tokens", sd, cfg, prepared, learned)
    if is_main:
        _export(sd, cfg, out, learned)
    if jax.process_count() > 1:  # hosts leave together, after process 0 has written the exports
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("tix: run exported")
    norms = {t: norm_vs_words(list(v.values()), context.words) for t, v in learned.items()}
    return Result(out, state, [p.concept.token for p in prepared], learned, cfg.steps, final_loss, compile_seconds,
                  float(np.mean(rates)) if rates else 0.0, files_read, norms, len(waves))


def place_frozen(sd: StableDiffusion, mesh: Any) -> Any:
    """The frozen weights on the devices, split over the "fsdp" axis (`compile_plan.abstract_args` mirrors this)."""
    return parallel.put(sd.params, parallel.fsdp_shardings(sd.params, mesh))


def table_sharding(mesh: Any, shapes: compile_plan.Shapes) -> Any:
    """Where a wave's tables sit: split over the concepts, or replicated (`Layout.sharded_tables`)."""
    return parallel.batch_sharded(mesh) if shapes.sharded_tables else parallel.replicated(mesh)


def place_wave(sd: StableDiffusion, cfg: TrainConfig, wave: list[Prepared], shapes: compile_plan.Shapes,
               resolution: int, mesh: Any, optimizer: Any) -> tuple[TrainState, Any, list[fs.Path]]:
    """A wave's initial train state and its tables on the devices, as the compiled step takes them (this process
    decodes only the images of the slots its devices hold); and the image files it decoded."""
    sharding = table_sharding(mesh, shapes)
    owned = range(*parallel.process_rows(shapes.slots, sharding))
    local, files = wave_tables(sd, cfg, wave, shapes, resolution, owned)
    tables = jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, x, (shapes.slots, *x.shape[1:])), local
    )
    vectors = initial_vectors(sd, wave, shapes.slots, shapes.n_max)
    state = TrainState(vectors, optimizer.init(vectors), np.zeros((), np.int32))
    return parallel.put_replicated(state, mesh), tables, files


def _warn_unreached_vectors(cfg: TrainConfig, prepared: list[Prepared]) -> None:
    """Progressive runs too short to switch every vector on export those vectors at their initial value."""
    if not cfg.progressive_every:
        return
    late = [p.concept.token for p in prepared if (p.concept.vectors - 1) * cfg.progressive_every >= cfg.steps]
    if late and jax.process_index() == 0:
        log.warning("progressive_every=%d: in %d steps %s do not switch on all their vectors (vector j switches on "
                    "at step j x %d); the ones never on are exported at their initial value",
                    cfg.progressive_every, cfg.steps, ", ".join(late), cfg.progressive_every)


@dataclasses.dataclass
class _RunContext:
    """What the side work of every wave needs from the run."""

    cfg: TrainConfig
    sd: StableDiffusion
    out: fs.Path
    resolution: int
    metrics_log: MetricsLog
    show: bool  # a progress bar
    stop: StopRequests
    words: tuple[float, ...]  # word_norms(sd)


class _Saver:
    """A wave's checkpoints, and the loss check that keeps a non-finite state from being saved."""

    def __init__(self, ckpt: Checkpoints, tokens: list[str], cfg: TrainConfig):
        self.ckpt = ckpt
        self.meta = {"tokens": tokens, "config": cfg.identity()}
        self.last = ckpt.latest()

    def loss(self, step: int, metrics: dict[str, Any]) -> float:
        loss = float(parallel.to_host(metrics["loss"]))
        if not math.isfinite(loss):
            raise TixError(
                f"the loss became {loss} at step {step}; training stopped. The last good checkpoint "
                f"({'step ' + str(self.last) if self.last is not None else 'none yet'}) is intact in "
                f"{self.ckpt.root}. Lower --lr, enable --set max_grad_norm=1.0, or use float32 (--set dtype=float32)."
            )
        return loss

    def save(self, step: int, state: TrainState, metrics: dict[str, Any]) -> None:
        if step == self.last:
            return
        self.loss(step, metrics)
        self.ckpt.save(step, state, self.meta)
        self.last = step


class _Progress:
    """The log hook: loss, per-concept loss, gradient norm and vector norm (over an ordinary word's) and speed to the
    metrics log and the progress bar."""

    def __init__(self, context: _RunContext, saver: _Saver, wave: list[Prepared], start: int, label: str):
        cfg = context.cfg
        tokens = [p.concept.token for p in wave]
        self.counts, self.words = [p.concept.vectors for p in wave], context.words
        from tqdm import tqdm

        self.bar = tqdm(total=cfg.steps, initial=start, disable=not context.show, desc=label or "invert",
                        dynamic_ncols=True)
        self.saver, self.metrics_log, self.stems = saver, context.metrics_log, output_stems(tokens)
        self.images_per_step = len(tokens) * cfg.batch_size * cfg.grad_accum
        self.t_last, self.step_last = time.perf_counter(), start
        self.ema: float | None = None
        self.rate = 0.0

    def __call__(self, step: int, state: TrainState, metrics: dict[str, Any]) -> None:
        loss = self.saver.loss(step, metrics)
        now = time.perf_counter()
        self.rate = self.images_per_step * (step - self.step_last) / (now - self.t_last)
        self.t_last, self.step_last = now, step
        self.ema = loss if self.ema is None else 0.9 * self.ema + 0.1 * loss
        values = {"loss": loss, "images_per_s": self.rate}
        for stem, pl, gn in zip(self.stems, parallel.to_host(metrics["concept_loss"]),
                                parallel.to_host(metrics["grad_norm"]), strict=False):
            values[f"loss/{stem}"] = float(pl)
            values[f"grad_norm/{stem}"] = float(gn)
        vectors = [np.asarray(v) for v in parallel.to_host(state.vectors)]
        for k, (stem, n) in enumerate(zip(self.stems, self.counts, strict=True)):
            values[f"norm_vs_words/{stem}"] = norm_vs_words([v[k, :n] for v in vectors], self.words)
        self.metrics_log.log(step, values)
        self.bar.set_postfix(loss=f"{self.ema:.4f}", img_s=f"{self.rate:.2f}")
        self.bar.update(step - self.bar.n)


def _train_wave(context: _RunContext, compiled, state: TrainState, frozen, tables, wave: list[Prepared],
                ckpt: Checkpoints, label: str) -> tuple[TrainState, float, float]:
    """Train one wave to `cfg.steps`; returns its state, last loss and images per second."""
    cfg = context.cfg
    tokens = [p.concept.token for p in wave]
    start = int(parallel.to_host(state.step))
    saver = _Saver(ckpt, tokens, cfg)
    progress = _Progress(context, saver, wave, start, label)

    def validate(step: int, state: TrainState, metrics: dict[str, Any]) -> None:
        _set_token_vectors(context.sd, wave, tuple(parallel.to_host(v) for v in state.vectors))
        if jax.process_index() == 0:
            _validate(context.sd, cfg, context.out, step, wave, context.resolution)

    def stop(step: int, state: TrainState, metrics: dict[str, Any]) -> None:
        signum = context.stop.agreed()
        if signum:
            saver.save(step, state, metrics)
            raise Stopped(f"stopped by {signal.Signals(signum).name}: saved step {step} in {ckpt.root}; continue "
                          "by running the same command with --resume", signum)

    hooks = [Hook(cfg.log_every, progress), Hook(cfg.save_every, saver.save), Hook(cfg.validate_every, validate),
             Hook(1, stop)]
    try:
        state, loss = run_steps(lambda s: compiled(s, frozen, tables), state, start, cfg.steps, hooks, saver.loss)
    finally:
        progress.bar.close()
    return state, loss, progress.rate


def write_embeddings(out: fs.Path, concepts: list[Any]) -> None:
    """A run's exports in diffusers format: one concept as learned_embeds.safetensors (what diffusers' examples
    write), several as embeddings/, a file per token (`exported_embeddings` finds either)."""
    from tix import embedding_files

    if len(concepts) == 1:
        embedding_files.write(concepts[0], out / "learned_embeds.safetensors", format="diffusers")
    else:
        embedding_files.write(concepts, out / "embeddings", format="diffusers")


def exported_embeddings(run: fs.Path) -> fs.Path:
    """The file or folder a finished run exported its tokens to."""
    for exported in (run / "learned_embeds.safetensors", run / "embeddings"):
        if fs.exists(exported):
            return exported
    raise TixError(f"{run}: no learned_embeds.safetensors or embeddings/ yet; the run has not finished (resume it "
                   "with `tix invert --resume`) or pass an exported embedding file")


def _export(sd: StableDiffusion, cfg: TrainConfig, out: Path, learned: dict[str, dict[str, np.ndarray]]) -> None:
    from tix import embedding_files

    made = library.run_provenance(sd, cfg)  # steps and model, so the files say what the run's library says
    write_embeddings(out, [embedding_files.Concept(token, vectors, made) for token, vectors in learned.items()])
    loss_curve(out)
    prompts = list(validation_prompts(cfg, cfg.style))
    write_html(out, f"tix invert: {', '.join(learned)}", list(learned), prompts)
    warnings.filterwarnings("default")


def summary(result: Result) -> str:
    lines = [f"learned {len(result.tokens)} token(s) in {result.out}:"]
    lines += [f"  {t}" + (f" (vectors {result.norms[t]:.1f}x an ordinary word's norm)" if t in result.norms else "")
              for t in result.tokens]
    lines.append(f"  embeddings: {result.out / 'learned_embeds.safetensors'} (diffusers format)")
    lines.append(f"  report:     {result.out / 'report.html'}")
    return "\n".join(lines)
