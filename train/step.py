"""The textual-inversion train step: pure functions of (state, frozen weights, concept tables).

Only the new vectors are state. The frozen weights are arguments (never closed-over constants, which XLA would fold
into the executable). Concept k draws its images, flips, prompts, timesteps and noise from its own stream
`fold_in(key(seed_k), step)`, its loss is a mean over its own samples and its gradient is clipped on its own, so a
concept's result does not depend on which other concepts share the step.
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from tix import schedule as sched
from tix.pipeline import StableDiffusion


class Tables(NamedTuple):
    """Per-concept data prepared once per wave (K concepts, padded to the same sizes)."""

    latent_mean: jax.Array  # [K, I, V, h, w, c] unscaled VAE means; V = crops x 2 flips (flip at odd index)
    latent_std: jax.Array  # same shape
    n_images: jax.Array  # [K] int32
    n_crops: jax.Array  # [K] int32
    prompt_ids: tuple[jax.Array, ...]  # per text encoder [K, P, 77] int32
    n_prompts: jax.Array  # [K] int32
    per_image: jax.Array  # [K] bool: prompt i belongs to image i
    seeds: jax.Array  # [K] uint32: each concept's own random stream
    weight: jax.Array  # [K] float32: 0 for padding concepts
    # Needed by the variants only (progressive_every, init_reg); `train.invert` always fills them.
    n_vectors: jax.Array | None = None  # [K] int32: the concept's own vectors (rows 0..n-1), then per-image tokens
    init_vectors: tuple[jax.Array, ...] | None = None  # per text encoder [K, n, D]: the rows' starting values
    # Read with `balance_levels` only: [K, levels] the frozen model's loss per tenth at the initial vectors
    # (`train.level_balance`); `train.invert` fills ones otherwise, so both settings compile the same arguments.
    level_loss: jax.Array | None = None


class TrainState(NamedTuple):
    vectors: tuple[jax.Array, ...]  # per text encoder [K, n, D] float32
    opt_state: Any
    step: jax.Array  # int32 scalar


class StepConfig(NamedTuple):
    """Static settings of the compiled step."""

    batch_size: int
    grad_accum: int
    flip_p: float
    min_snr_gamma: float | None
    max_grad_norm: float | None
    resolution: int
    init_reg: float = 0.0  # weight of the pull toward the initial vectors (`init_regulariser`)
    progressive_every: int = 0  # >0: a concept's vectors switch on one by one, every this many steps
    per_image_mix: float = 0.0  # probability that a sample's prompt also names its image's own token
    timestep_bias: float = 0.0  # >0: timesteps drawn with density ~ (t / T)^bias (`tix.schedule.training_timesteps`)
    balance_levels: bool = False  # each sample's loss divided by the table's loss at its level (`train.level_balance`)


def clip_per_concept(max_norm: float) -> optax.GradientTransformation:
    """Clip each concept's gradient (its rows in every text encoder together) to `max_norm`, independently."""

    def update(updates, state, params=None):
        del params
        sq = sum(jnp.sum(jnp.square(u.astype(jnp.float32)), axis=tuple(range(1, u.ndim))) for u in updates)
        scale = jnp.minimum(1.0, max_norm / jnp.maximum(jnp.sqrt(sq), 1e-12))
        return tuple(u * scale.reshape((-1,) + (1,) * (u.ndim - 1)).astype(u.dtype) for u in updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def optimizer_program(settings: dict[str, Any]) -> dict[str, Any]:
    """Of `make_optimizer`'s arguments, those its compiled update depends on: the step count only shapes a cosine
    schedule, so runs of different lengths otherwise share one compiled step."""
    return {k: v for k, v in settings.items() if k != "steps" or settings.get("schedule") == "cosine"}


def make_optimizer(
    lr: float, steps: int, *, schedule: str = "constant", warmup: int = 0, weight_decay: float = 1e-2,
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, max_grad_norm: float | None = None,
) -> optax.GradientTransformation:
    """AdamW with decoupled weight decay over the new vectors (the only parameters it ever sees)."""
    if schedule == "cosine":
        lr_fn = optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 0), max(steps, warmup + 1), end_value=0.0)
    else:
        lr_fn = optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup]) \
            if warmup else optax.constant_schedule(lr)
    parts = [clip_per_concept(max_grad_norm)] if max_grad_norm else []
    parts.append(optax.adamw(lr_fn, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    return optax.chain(*parts)


def _draw(key: jax.Array, k_tables: dict[str, jax.Array], cfg: StepConfig, num_train_timesteps: int):
    """One concept's random choices for `batch_size` samples."""
    ki, kc, kf, kp, kt, kn, kl = jax.random.split(key, 7)
    b = cfg.batch_size
    img = jax.random.randint(ki, (b,), 0, k_tables["n_images"])
    crop = jax.random.randint(kc, (b,), 0, k_tables["n_crops"])
    flip = jax.random.bernoulli(kf, cfg.flip_p, (b,)).astype(jnp.int32)
    prompt = jnp.where(k_tables["per_image"], img, jax.random.randint(kp, (b,), 0, k_tables["n_prompts"]))
    if cfg.per_image_mix:
        # A stream folded off the prompt's key, so runs without per-image tokens keep their draws bit for bit.
        dual = jax.random.bernoulli(jax.random.fold_in(kp, 1), cfg.per_image_mix, (b,))
        prompt = jnp.where(dual, image_token_row(prompt, img, k_tables), prompt)
    t = sched.training_timesteps(kt, (b,), num_train_timesteps, cfg.timestep_bias)
    return img, crop * 2 + flip, prompt, t, kn, kl


def image_token_row(prompt: jax.Array, img: jax.Array, k_tables: dict[str, jax.Array]) -> jax.Array:
    """The prompt-table row of `prompt` with image `img`'s own token added ("... with S_i"), in the layout
    `train.data.training_prompts` builds: after the n_prompts plain rows, one row per caption (per-image captions)
    or per (template, image) pair, template-major."""
    offset = jnp.where(k_tables["per_image"], img, prompt * k_tables["n_images"] + img)
    return k_tables["n_prompts"] + offset


class Layout(NamedTuple):
    """How a step's rows and tables sit on the devices.

    `sharded_tables`: the concept tables are split along K over every device (each device, and so each host, holds
    only the concepts whose rows it computes; used when there are at least as many concepts as devices). Otherwise the
    tables are replicated and each concept's rows may spread over several devices.
    """

    mesh: Any = None
    sharded_tables: bool = False


SINGLE_DEVICE = Layout()


def draw_batch(tables: Tables, cfg: StepConfig, num_train_timesteps: int, key_step: jax.Array):
    """Every concept's samples for one micro-step: (unscaled latents, noise, timesteps, ids per encoder), rows
    concept-major. Concept k's draws depend only on its seed and the step, never on its neighbours."""
    num_k = tables.n_images.shape[0]
    b = cfg.batch_size
    keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), key_step))(tables.seeds)
    k_tables = {"n_images": tables.n_images, "n_crops": tables.n_crops, "n_prompts": tables.n_prompts,
                "per_image": tables.per_image}
    img, view, prompt, t, kn, kl = jax.vmap(lambda key, tab: _draw(key, tab, cfg, num_train_timesteps))(keys, k_tables)
    concept = jnp.repeat(jnp.arange(num_k), b)
    img, view, prompt, t = (x.reshape(-1) for x in (img, view, prompt, t))
    mean = tables.latent_mean[concept, img, view]
    std = tables.latent_std[concept, img, view]
    shape = mean.shape[1:]
    noise = jax.vmap(lambda k: jax.random.normal(k, (b, *shape), jnp.float32))(kn).reshape(-1, *shape)
    eps = jax.vmap(lambda k: jax.random.normal(k, (b, *shape), jnp.float32))(kl).reshape(-1, *shape)
    ids = tuple(p[concept, prompt] for p in tables.prompt_ids)
    return mean + std * eps, noise, t, ids


# ---- the paper's variants (Gal et al. 2022, Fig. 10): pure functions the step applies around its diffusion loss ----


def active_vectors(step: jax.Array, n_vectors: jax.Array, every: int) -> jax.Array:
    """[K] how many of each concept's vectors are in use at `step`: all of them, or with `every` > 0 (the paper's
    progressive extension) one at first and one more every `every` steps, up to the concept's count."""
    if not every:
        return n_vectors
    return jnp.minimum(n_vectors, 1 + step // every).astype(n_vectors.dtype)


def inactive_rows(n_rows: int, n_vectors: jax.Array, active: jax.Array) -> jax.Array:
    """[K, n_rows] True where row j is one of the concept's own vectors not yet switched on (active <= j < n).
    Rows past a concept's vectors (per-image tokens, padding) are never inactive."""
    j = jnp.arange(n_rows)
    return (j >= active[:, None]) & (j < n_vectors[:, None])


def drop_inactive(ids: jax.Array, vocab: int, n_rows: int, n_vectors: jax.Array, active: jax.Array) -> jax.Array:
    """Prompt ids [R, T] without the placeholder positions of vectors not yet switched on; `n_vectors`, `active`:
    [R], of the concept each prompt row belongs to.

    The placeholder sequence grows as vectors switch on, as in the paper's code: the kept ids close up in order and
    the tail is refilled with the row's last id (its padding), so the prompt is exactly the one a token of `active`
    vectors tokenizes to, and the UNet never sees the inactive vectors. Placeholder id vocab + s * n_rows + j
    reads row j of concept slot s (see `train.invert`)."""
    row = jnp.where(ids >= vocab, (ids - vocab) % n_rows, -1)
    drop = (row >= active[:, None]) & (row < n_vectors[:, None])
    order = jnp.argsort(drop, axis=-1, stable=True)  # kept positions first, in their order
    kept = jnp.take_along_axis(ids, order, axis=-1)
    n_kept = ids.shape[-1] - jnp.sum(drop, axis=-1, keepdims=True)
    return jnp.where(jnp.arange(ids.shape[-1]) < n_kept, kept, ids[:, -1:])


def init_regulariser(vectors: tuple[jax.Array, ...], init: tuple[jax.Array, ...], active: jax.Array) -> jax.Array:
    """[K] mean over each concept's vectors in use (rows 0..active-1) of ||v - v0||^2, the squared distance of the
    vector (its rows in every text encoder together) from its initial value.

    Squared L2 because it is the paper's regulariser (its code's `embedding_to_coarse_loss`: (v - v0)(v - v0)^T for
    one vector), a Gaussian prior around the initializer word whose pull grows with the distance; the mean over
    vectors, not the sum, keeps one `init_reg` meaning the same strength for 1 or 3 vectors (the paper's code takes
    the mean of the n x n Gram matrix instead, which only matches for one vector). Per-image tokens and vectors not
    yet switched on are left out: the former are a training device, the latter sit at v0."""
    rows = vectors[0].shape[1]
    used = (jnp.arange(rows) < active[:, None]).astype(jnp.float32)
    sq = sum(jnp.sum(jnp.square(v.astype(jnp.float32) - v0.astype(jnp.float32)), axis=-1)
             for v, v0 in zip(vectors, init, strict=True))
    return jnp.sum(sq * used, axis=1) / jnp.maximum(jnp.sum(used, axis=1), 1.0)


def draw_on_devices(tables: Tables, cfg: StepConfig, num_train_timesteps: int, key_step: jax.Array, layout: Layout):
    from tix.parallel import DATA_AXES

    draw = partial(draw_batch, cfg=cfg, num_train_timesteps=num_train_timesteps)
    if layout.mesh is None:
        return draw(tables, key_step=key_step)
    rows = PartitionSpec(DATA_AXES)
    if layout.sharded_tables:
        # Each device draws for the concepts it holds: no table leaves its device, no host feeds another's rows.
        return jax.shard_map(
            lambda tab, key: draw(tab, key_step=key), mesh=layout.mesh,
            in_specs=(jax.tree.map(lambda _: rows, tables), PartitionSpec()), out_specs=rows,
        )(tables, key_step)
    out = draw(tables, key_step=key_step)
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, NamedSharding(layout.mesh, rows)), out)


def diffusion_loss(
    sd: StableDiffusion,
    params: dict[str, Any],
    vectors: tuple[jax.Array, ...],
    x0: jax.Array,
    noise: jax.Array,
    timesteps: jax.Array,
    ids: tuple[jax.Array, ...],
) -> jax.Array:
    """Per-sample [B] mean squared error of the UNet's prediction against the scheduler's target (epsilon or v), before
    any loss weighting: the textual-inversion loss on given draws.

    `x0`: scaled latents [B, h, w, c]; `vectors`: per text encoder, the [N, D] rows that placeholder ids >= vocab size
    read; `ids`: per text encoder [B, 77] as `sd.tokenize` gives them. SDXL's time ids are those of an uncropped image
    at the latents' pixel size, and its pooled embedding is taken at the first EOS (see `StableDiffusion.text_fn`).
    """
    context, pooled = sd.text_fn(params, ids, vectors)
    noisy = sched.add_noise(sd.schedule, x0, noise, timesteps)
    target = sched.target(sd.schedule, x0, noise, timesteps)
    pred = sd.unet_fn(params, noisy, timesteps, context, pooled)
    return jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)), axis=(1, 2, 3))


def loss_fn(
    vectors: tuple[jax.Array, ...],
    sd: StableDiffusion,
    cfg: StepConfig,
    frozen: dict[str, Any],
    tables: Tables,
    key_step: jax.Array,
    layout: Layout = SINGLE_DEVICE,
    active: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(total loss, per-concept losses). Total = sum over concepts of weight_k x loss of concept k: its mean
    diffusion loss, plus `cfg.init_reg` x `init_regulariser`. `active` [K]: vectors in use (default: all)."""
    num_k = tables.n_images.shape[0]
    latents, noise, t, ids = draw_on_devices(tables, cfg, sd.schedule.num_train_timesteps, key_step, layout)
    active = tables.n_vectors if active is None else active
    if cfg.progressive_every:  # a separate pass over the drawn ids: the diffusion loss below is the plain one
        per_row = (jnp.repeat(tables.n_vectors, cfg.batch_size), jnp.repeat(active, cfg.batch_size))
        n_rows = vectors[0].shape[1]
        ids = tuple(drop_inactive(i, side.vocab_size, n_rows, *per_row) for i, side in zip(ids, sd.text, strict=True))
    rows = tuple(v.reshape(-1, v.shape[-1]) for v in vectors)
    per_sample = diffusion_loss(sd, frozen, rows, sd.scale_latents(latents), noise, t, ids)
    if cfg.min_snr_gamma:
        per_sample = per_sample * sched.min_snr_weight(sd.schedule, t, cfg.min_snr_gamma)
    if cfg.balance_levels:
        per_sample = per_sample * sched.balanced_level_weight(tables.level_loss, t, sd.schedule.num_train_timesteps)
    per_concept = per_sample.reshape(num_k, cfg.batch_size).mean(axis=1)
    if cfg.init_reg:
        per_concept = per_concept + cfg.init_reg * init_regulariser(vectors, tables.init_vectors, active)
    return jnp.sum(per_concept * tables.weight), per_concept


def train_step(
    sd: StableDiffusion,
    cfg: StepConfig,
    optimizer: optax.GradientTransformation,
    state: TrainState,
    frozen: dict[str, Any],
    tables: Tables,
    layout: Layout = SINGLE_DEVICE,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step over `grad_accum` micro-batches; gradients reach only `state.vectors`."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    active = active_vectors(state.step, tables.n_vectors, cfg.progressive_every) if cfg.progressive_every else None

    def micro(carry, i):
        key_step = state.step * cfg.grad_accum + i
        (loss, per_concept), grads = grad_fn(state.vectors, sd, cfg, frozen, tables, key_step, layout, active)
        acc_loss, acc_pc, acc_g = carry
        return (acc_loss + loss, acc_pc + per_concept, jax.tree.map(jnp.add, acc_g, grads)), None

    zeros = jax.tree.map(jnp.zeros_like, state.vectors)
    num_k = tables.n_images.shape[0]
    init = (jnp.zeros((), jnp.float32), jnp.zeros((num_k,), jnp.float32), zeros)
    if cfg.grad_accum == 1:
        # No loop for one micro-batch: inside a while loop XLA:CPU left the UNet's backward convolutions on its slow
        # generic kernel (a third of the step at 64 px), outside it they take the fast path.
        (loss, per_concept, grads), _ = micro(init, 0)
    else:
        (loss, per_concept, grads), _ = jax.lax.scan(micro, init, jnp.arange(cfg.grad_accum))
    scale = 1.0 / cfg.grad_accum
    grads = jax.tree.map(lambda g: g * scale, grads)
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g), axis=tuple(range(1, g.ndim))) for g in grads))
    updates, opt_state = optimizer.update(grads, state.opt_state, state.vectors)
    if cfg.progressive_every:
        # Their gradient is zero already; this also keeps weight decay off them, so they wait at their initial
        # value (the init word) and start from it when they switch on.
        frozen_rows = inactive_rows(state.vectors[0].shape[1], tables.n_vectors, active)[..., None]
        updates = tuple(jnp.where(frozen_rows, jnp.zeros_like(u), u) for u in updates)
    vectors = optax.apply_updates(state.vectors, updates)
    metrics = {"loss": loss * scale, "concept_loss": per_concept * scale, "grad_norm": grad_norm}
    return TrainState(vectors, opt_state, state.step + 1), metrics
