"""The per-wave tables of the train step: each concept slot's cached latents, tokenized prompts and seed, stacked
for the slots a process owns; the wave's initial vectors; and how many slots a step holds.

Built once per wave, before training; the step then draws everything it needs from them on the device."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tix import fs
from tix.pipeline import StableDiffusion
from train import data
from train.compile_plan import Shapes
from train.config import TrainConfig
from train.level_balance import LEVELS
from train.step import Tables


@dataclasses.dataclass
class Prepared:
    """What every process knows about a concept (cheap: no image is decoded)."""

    concept: data.Concept
    init: list[np.ndarray]
    seed: int


def encode_latents(sd: StableDiffusion, pixels: np.ndarray, chunk: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """VAE latent distributions (unscaled mean, std) of every view, once per run."""
    flat = pixels.reshape(-1, *pixels.shape[-3:])
    encode = jax.jit(sd.encode_fn)
    means, stds = [], []
    for i in range(0, len(flat), chunk):
        mean, logvar = encode(sd.params, jnp.asarray(flat[i:i + chunk]))
        means.append(np.asarray(mean, np.float32))
        stds.append(np.exp(0.5 * np.asarray(logvar, np.float32)))
    shape = pixels.shape[:-3]
    mean, std = np.concatenate(means), np.concatenate(stds)
    return mean.reshape(*shape, *mean.shape[1:]), std.reshape(*shape, *std.shape[1:])


def _views(cfg: TrainConfig) -> int:
    return 2 * (1 if cfg.center_crop else cfg.random_crops)


def slot_tables(sd: StableDiffusion, cfg: TrainConfig, p: Prepared | None, slot: int, n_max: int, resolution: int,
                 i_max: int, p_max: int) -> dict[str, Any]:
    """One slot's rows of the tables. Decodes and encodes the concept's images (the expensive part, done only by the
    process whose devices use them). `p=None` is a weight-0 filler slot."""
    latent = resolution // sd.vae_scale_factor
    shape = (i_max, _views(cfg), latent, latent, sd.unet.config.in_channels)
    if p is None:
        ids = sd.tokenize([""])
        init = tuple(np.zeros((n_max, side.width), np.float32) for side in sd.text)
        return dict(latent_mean=np.zeros(shape, np.float32), latent_std=np.ones(shape, np.float32), n_images=1,
                    n_crops=1, prompt_ids=tuple(np.repeat(i, p_max, axis=0) for i in ids), n_prompts=1,
                    per_image=False, seed=0, weight=0.0, files=[], n_vectors=1, init_vectors=init)
    pixels, prompts, files = data.load_concept_pixels(p.concept, cfg, resolution)
    mean, std = encode_latents(sd, pixels)
    image_tokens = None
    if cfg.per_image_tokens:  # the tokens of the images that loaded, in the order of the image table
        names = data.image_tokens(p.concept.token, len(p.concept.images))
        image_tokens = [names[p.concept.images.index(f)] for f in files]
    ids = sd.tokenize(data.training_prompts(prompts, p.concept.token, image_tokens, p.concept.per_image_captions))
    rows = p.init[0].shape[0]  # the token's vectors, then its per-image tokens: one block of ids
    prompt_ids = []
    for e, side in enumerate(sd.text):
        # Renumber placeholder ids so slot s, vector j reads row s * n_max + j of the step's vectors.
        side_ids = ids[e].copy()
        first = side.vocab_size + side.added.index(p.concept.token)
        mask = (side_ids >= first) & (side_ids < first + rows)
        side_ids[mask] = side.vocab_size + slot * n_max + (side_ids[mask] - first)
        prompt_ids.append(_pad_to(side_ids, p_max))
    init = tuple(np.pad(v, ((0, n_max - rows), (0, 0))) for v in p.init)
    return dict(latent_mean=_pad_to(mean, i_max), latent_std=_pad_to(std, i_max), n_images=mean.shape[0],
                n_crops=mean.shape[1] // 2, prompt_ids=tuple(prompt_ids), n_prompts=len(prompts),
                per_image=p.concept.per_image_captions, seed=p.seed, weight=1.0, files=files,
                n_vectors=p.concept.vectors, init_vectors=init)


def _prompt_rows(p: Prepared, cfg: TrainConfig) -> int:
    """An upper bound of the concept's prompt-table rows (`data.training_prompts`; unreadable images lower it)."""
    plain = len(p.concept.prompts)
    if not cfg.per_image_tokens:
        return plain
    return 2 * plain if p.concept.per_image_captions else plain * (1 + len(p.concept.images))


def _pad_to(a: np.ndarray, n: int) -> np.ndarray:
    return np.concatenate([a, np.repeat(a[-1:], n - a.shape[0], axis=0)]) if a.shape[0] < n else a


def wave_tables(sd: StableDiffusion, cfg: TrainConfig, wave: list[Prepared], shapes: Shapes, resolution: int,
                owned: range) -> tuple[Tables, list[fs.Path]]:
    """The wave's tables for the slots in `owned` (this process's share), stacked; and the image files decoded.
    Every wave has the run's `shapes` (padded to the run's largest concept), so one compiled step serves them all."""
    parts = [slot_tables(sd, cfg, wave[s] if s < len(wave) else None, s, shapes.n_max, resolution, shapes.images,
                         shapes.prompts) for s in owned]
    tables = Tables(
        latent_mean=np.stack([q["latent_mean"] for q in parts]),
        latent_std=np.stack([q["latent_std"] for q in parts]),
        n_images=np.array([q["n_images"] for q in parts], np.int32),
        n_crops=np.array([q["n_crops"] for q in parts], np.int32),
        prompt_ids=tuple(np.stack([q["prompt_ids"][e] for q in parts]) for e in range(len(sd.text))),
        n_prompts=np.array([q["n_prompts"] for q in parts], np.int32),
        per_image=np.array([q["per_image"] for q in parts]),
        seeds=np.array([q["seed"] for q in parts], np.uint32),
        weight=np.array([q["weight"] for q in parts], np.float32),
        n_vectors=np.array([q["n_vectors"] for q in parts], np.int32),
        init_vectors=tuple(np.stack([q["init_vectors"][e] for q in parts]) for e in range(len(sd.text))),
        level_loss=np.ones((len(parts), LEVELS), np.float32),  # measured on the devices when asked for
    )
    return tables, [f for q in parts for f in q["files"]]


def initial_vectors(sd: StableDiffusion, wave: list[Prepared], slots: int, n_max: int) -> tuple[np.ndarray, ...]:
    """Per text encoder, [slots, n_max, D]: each concept's initial vectors in its slot, zeros elsewhere."""
    out = []
    for e, side in enumerate(sd.text):
        rows = np.zeros((slots, n_max, side.width), np.float32)
        for s, p in enumerate(wave):
            rows[s, :p.init[e].shape[0]] = p.init[e]
        out.append(rows)
    return tuple(out)


def plan_layout(num_concepts: int, batch_size: int, devices: int) -> tuple[int, bool]:
    """(slots, sharded_tables): how many concept slots a step holds (real ones plus weight-0 fillers) and whether
    the concept tables are split over the devices.

    With at least as many concepts as devices, every device computes whole concepts and holds only their tables, so
    each host reads and encodes only its own concepts' images. With fewer, a concept's rows spread over several
    devices and the (small) tables are replicated."""
    if num_concepts >= devices:
        return -(-num_concepts // devices) * devices, True
    slots = num_concepts
    while (slots * batch_size) % devices:
        slots += 1
    return slots, False


def step_shapes(cfg: TrainConfig, prepared: list[Prepared], concepts_per_step: int, devices: int) -> Shapes:
    """The sizes of the step that trains `concepts_per_step` of `prepared` at a time on `devices`: what
    `wave_tables` builds for every wave, and what a plan compiles from (`compile_plan.abstract_args`)."""
    slots, sharded = plan_layout(min(concepts_per_step, len(prepared)), cfg.batch_size, devices)
    return Shapes(slots=slots, sharded_tables=sharded,
                  n_max=max(p.init[0].shape[0] for p in prepared),  # vectors, and per-image tokens if any
                  images=max(len(p.concept.images) for p in prepared),
                  prompts=max(_prompt_rows(p, cfg) for p in prepared), views=_views(cfg))
