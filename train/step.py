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


def clip_per_concept(max_norm: float) -> optax.GradientTransformation:
    """Clip each concept's gradient (its rows in every text encoder together) to `max_norm`, independently."""

    def update(updates, state, params=None):
        del params
        sq = sum(jnp.sum(jnp.square(u.astype(jnp.float32)), axis=tuple(range(1, u.ndim))) for u in updates)
        scale = jnp.minimum(1.0, max_norm / jnp.maximum(jnp.sqrt(sq), 1e-12))
        return tuple(u * scale.reshape((-1,) + (1,) * (u.ndim - 1)).astype(u.dtype) for u in updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


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
    t = jax.random.randint(kt, (b,), 0, num_train_timesteps)
    return img, crop * 2 + flip, prompt, t, kn, kl


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


def _draw_on_devices(tables: Tables, cfg: StepConfig, num_train_timesteps: int, key_step: jax.Array, layout: Layout):
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


def loss_fn(
    vectors: tuple[jax.Array, ...],
    sd: StableDiffusion,
    cfg: StepConfig,
    frozen: dict[str, Any],
    tables: Tables,
    key_step: jax.Array,
    layout: Layout = SINGLE_DEVICE,
) -> tuple[jax.Array, jax.Array]:
    """(total loss, per-concept losses). Total = sum over concepts of weight_k x mean loss of concept k."""
    num_k = tables.n_images.shape[0]
    latents, noise, t, ids = _draw_on_devices(tables, cfg, sd.schedule.num_train_timesteps, key_step, layout)
    x0 = sd.scale_latents(latents)
    extra = tuple(v.reshape(-1, v.shape[-1]) for v in vectors)
    context, pooled = sd.text_fn(frozen, ids, extra)
    noisy = sched.add_noise(sd.schedule, x0, noise, t)
    target = sched.target(sd.schedule, x0, noise, t)
    time_ids = None
    if sd.kind == "sdxl":
        r = cfg.resolution
        time_ids = jnp.tile(jnp.asarray([[r, r, 0, 0, r, r]], jnp.float32), (t.shape[0], 1))
    pred = sd.unet_fn(frozen, noisy, t, context, pooled, time_ids)
    per_sample = jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)), axis=(1, 2, 3))
    if cfg.min_snr_gamma:
        per_sample = per_sample * sched.min_snr_weight(sd.schedule, t, cfg.min_snr_gamma)
    per_concept = per_sample.reshape(num_k, cfg.batch_size).mean(axis=1)
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

    def micro(carry, i):
        key_step = state.step * cfg.grad_accum + i
        (loss, per_concept), grads = grad_fn(state.vectors, sd, cfg, frozen, tables, key_step, layout)
        acc_loss, acc_pc, acc_g = carry
        return (acc_loss + loss, acc_pc + per_concept, jax.tree.map(jnp.add, acc_g, grads)), None

    zeros = jax.tree.map(jnp.zeros_like, state.vectors)
    num_k = tables.n_images.shape[0]
    init = (jnp.zeros((), jnp.float32), jnp.zeros((num_k,), jnp.float32), zeros)
    (loss, per_concept, grads), _ = jax.lax.scan(micro, init, jnp.arange(cfg.grad_accum))
    scale = 1.0 / cfg.grad_accum
    grads = jax.tree.map(lambda g: g * scale, grads)
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g), axis=tuple(range(1, g.ndim))) for g in grads))
    updates, opt_state = optimizer.update(grads, state.opt_state, state.vectors)
    vectors = optax.apply_updates(state.vectors, updates)
    metrics = {"loss": loss * scale, "concept_loss": per_concept * scale, "grad_norm": grad_norm}
    return TrainState(vectors, opt_state, state.step + 1), metrics
