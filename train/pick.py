"""`tix pick`: of several runs that learned the same concepts from the same images (at another learning rate, seed
or step count), keep each concept's vectors from the run whose vectors fit its training images best, judged by the
training objective itself: the diffusion loss on those images under one fixed set of noise and timesteps, the same
for every run, so a difference between runs is their vectors' and not the draws'. No image is sampled.

Why: one vector's result on a concept can hang on its optimisation. On the toy world the yellow dotted triangle is
learned at twice the default rate and missed at the default, while two circles go the other way, and this loss
picks the better run in each case (README, toy world, random draw) at a fraction of what sampling them would cost.
The draws weigh every timestep alike, as default training does: a run trained with `timestep_bias`,
`min_snr_gamma` or `balance_noise_levels` optimised another weighting and is judged by one it did not train for.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tix import embedding_files, fs
from tix.embedding_files import Concept as Embedding
from tix.errors import ConfigError, TixError
from tix.pipeline import StableDiffusion
from tix.schedule import NoiseSchedule, stratified_timesteps
from train import data
from train.config import TrainConfig
from train.invert import exported_embeddings, write_embeddings
from train.step import diffusion_loss
from train.tables import encode_latents

log = logging.getLogger("tix")

BUCKETS = 10  # timesteps come evenly from each tenth of the schedule, so no range is missed by chance
CHUNK = 8  # samples per UNet call: hundreds of 512 px samples at once would not fit a device


# ---- pure functions ----------------------------------------------------------------------------------------------
def fixed_timesteps(schedule: NoiseSchedule, samples_per_bucket: int, key: jax.Array) -> jax.Array:
    """[BUCKETS x samples_per_bucket] timesteps, bucket-major: `samples_per_bucket` uniform draws in each tenth."""
    return stratified_timesteps(key, BUCKETS, samples_per_bucket, schedule.num_train_timesteps)


def chunk_loss(sd: StableDiffusion, params: Any, rows: tuple[jax.Array, ...], x0: jax.Array, sample: jax.Array,
               timesteps: jax.Array, noise_key: jax.Array, ids: tuple[jax.Array, ...], valid: jax.Array) -> jax.Array:
    """The summed loss of one chunk of fixed draws: sample s reads latent s mod len(x0) and noise drawn from
    `fold_in(noise_key, s)`, so no draw depends on how the samples are chunked; `valid` masks the last chunk's
    padding."""
    noise = jax.vmap(lambda s: jax.random.normal(jax.random.fold_in(noise_key, s), x0.shape[1:], x0.dtype))(sample)
    per_sample = diffusion_loss(sd, params, rows, x0[sample % x0.shape[0]], noise, timesteps, ids)
    return jnp.sum(per_sample * valid)


# ---- the fixed-draw loss of candidate vectors ----------------------------------------------------------------------
def add_placeholders(sd: StableDiffusion, candidates: Sequence[Embedding]) -> dict[int, str]:
    """One placeholder per vector count among `candidates`; each candidate's vectors are written into its count's
    rows per call, so the rows keep one shape and the loss compiles once."""
    names = {n: f"<tix-pick-{n}>" for n in sorted({c.num_vectors for c in candidates})}
    for n, name in names.items():
        sd.add_tokens(name, [np.zeros((n, side.width), np.float32) for side in sd.text])
    return names


def sample_prompts(prompts: Sequence[str], latents: int, samples: int) -> list[str]:
    """The template of each sample: sample s reads latent s mod `latents`, so per-latent prompts (captions, one per
    latent) follow it; otherwise the templates cycle."""
    if len(prompts) == latents:
        return [prompts[s % latents] for s in range(samples)]
    return [prompts[s % len(prompts)] for s in range(samples)]


def candidate_rows(sd: StableDiffusion, placeholders: dict[int, str], candidate: Embedding) -> tuple[jax.Array, ...]:
    """Per text encoder, the placeholder rows with the candidate's vectors written into its count's placeholder."""
    rows = []
    for side in sd.text:
        extra = np.array(side.extra)
        start = side.added.index(placeholders[candidate.num_vectors])
        extra[start:start + candidate.num_vectors] = candidate.vectors[side.name]
        rows.append(jnp.asarray(extra))
    return tuple(rows)


def candidate_losses(sd: StableDiffusion, placeholders: dict[int, str], candidates: Sequence[Embedding],
                     latents: np.ndarray, prompts: Sequence[str], *, repeats: int, seed: int,
                     loss: Any = None) -> np.ndarray:
    """The mean fixed-draw loss of each candidate on scaled `latents` [L, h, w, c]: every latent `repeats` times in
    each tenth of the schedule. `prompts`: templates with "{}" (see `sample_prompts`). `loss`: `jax.jit` of
    `chunk_loss` bound to `sd`, to share one compilation between calls (the weights are its argument, not
    constants baked into the program)."""
    loss = loss or jax.jit(functools.partial(chunk_loss, sd))
    count = len(latents) * repeats * BUCKETS
    padded = count + (-count % CHUNK)
    key_t, key_n = jax.random.split(jax.random.key(seed))
    timesteps = fixed_timesteps(sd.schedule, len(latents) * repeats, key_t)
    timesteps = jnp.concatenate([timesteps, jnp.zeros(padded - count, jnp.int32)])
    samples, valid = jnp.arange(padded), jnp.arange(padded) < count
    x0 = jnp.asarray(latents)
    templates = sample_prompts(prompts, len(latents), padded)
    out = []
    for candidate in candidates:
        rows = candidate_rows(sd, placeholders, candidate)
        ids = sd.tokenize([t.format(placeholders[candidate.num_vectors]) for t in templates])
        total = sum(float(loss(sd.params, rows, x0, samples[c:c + CHUNK], timesteps[c:c + CHUNK], key_n,
                               tuple(jnp.asarray(i[c:c + CHUNK]) for i in ids), valid[c:c + CHUNK]))
                    for c in range(0, padded, CHUNK))
        out.append(total / count)
    return np.array(out)


# ---- run folders (I/O) ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Run:
    folder: fs.Path
    cfg: TrainConfig
    concepts: dict[str, data.Concept]  # by token: its images and prompts
    learned: dict[str, Embedding]  # by token: its exported vectors


def read_run(folder: fs.PathLike) -> Run:
    folder = fs.path(folder)
    if not fs.exists(folder / "config.yaml"):
        raise ConfigError(f"{folder}: not a tix run folder (no config.yaml); give the --out folders of `tix invert` "
                          "runs")
    cfg = TrainConfig.from_yaml(fs.read_text(folder / "config.yaml"))
    learned = {c.token: c for c in embedding_files.read(exported_embeddings(folder))}
    concepts = {spec.token: data.resolve_concept(spec, cfg) for spec in data.concept_specs(cfg)}
    return Run(folder, cfg, concepts, learned)


def _image_digest(concept: data.Concept) -> str:
    digest = hashlib.sha256()
    for path in sorted(concept.images, key=lambda p: p.name):
        digest.update(path.name.encode() + b"\0" + fs.read_bytes(path))
    return digest.hexdigest()


def _check_comparable(runs: Sequence[Run]) -> list[str]:
    """The tokens every run learned, after refusing runs that cannot be compared."""
    first = runs[0]
    for run in runs[1:]:
        for field in ("model", "resolution"):
            if getattr(run.cfg, field) != getattr(first.cfg, field):
                raise ConfigError(f"{run.folder} and {first.folder} differ in {field} ({getattr(run.cfg, field)} and "
                                  f"{getattr(first.cfg, field)}); pick compares runs of one model at one resolution")
    for field in ("timestep_bias", "min_snr_gamma", "balance_noise_levels"):
        values = [getattr(r.cfg, field) for r in runs]
        if len(set(values)) > 1:
            log.warning("the runs differ in %s (%s): the pick weighs every timestep alike, as default training does, "
                        "so a run trained with another weighting is judged by one it did not train for",
                        field, ", ".join(map(str, values)))
    tokens = [t for t in first.learned if all(t in r.learned and t in r.concepts for r in runs)]
    if not tokens:
        raise TixError(f"the runs share no learned token ({', '.join(str(r.folder) for r in runs)}); pick compares "
                       "runs that learned the same concepts")
    for token in tokens:
        digests = {_image_digest(r.concepts[token]) for r in runs}
        if len(digests) > 1:
            raise ConfigError(f"{token}: the runs trained it on different images; pick compares runs of the same "
                              "images (a loss on other images would not say which vectors fit these)")
    return tokens


def _empty_out(out: fs.Path, runs: Sequence[Run]) -> fs.Path:
    if any(fs.path(out) == r.folder for r in runs):
        raise ConfigError(f"--out {out} is one of the runs; give a new folder, so no run's exports are overwritten")
    if fs.exists(out) and (not fs.is_dir(out) or fs.listdir(out)):
        raise ConfigError(f"--out {out} exists and is not an empty folder; give a new folder")
    out.mkdir(parents=True, exist_ok=True)
    return out


def pick_runs(folders: Sequence[fs.PathLike], out: fs.PathLike, *, repeats: int = 8, seed: int = 0,
              sd: StableDiffusion | None = None) -> dict[str, Any]:
    """The whole `tix pick` command: writes the picked vectors (diffusers format, as `tix invert` exports them) and
    pick.json with every run's loss to `out`; returns pick.json's contents."""
    import tix

    if len(folders) < 2:
        raise ConfigError("give at least two run folders to pick between")
    if repeats < 1:
        raise ConfigError(f"--repeats {repeats}: give at least 1 draw per image and tenth of the schedule")
    runs = [read_run(f) for f in folders]
    tokens = _check_comparable(runs)
    out = _empty_out(fs.path(out), runs)
    cfg = runs[0].cfg
    sd = sd or tix.load(cfg.model, cfg.dtype, compute_dtype=cfg.compute_dtype)
    resolution = cfg.resolution or sd.default_size
    placeholders = add_placeholders(sd, [r.learned[t] for r in runs for t in tokens])
    loss = jax.jit(functools.partial(chunk_loss, sd))
    summary: dict[str, Any] = {"runs": [str(r.folder) for r in runs], "repeats": repeats, "seed": seed,
                               "concepts": {}}
    picked = []
    for token in tokens:
        pixels, prompts, _ = data.load_concept_pixels(runs[0].concepts[token], cfg, resolution)
        mean, _ = encode_latents(sd, pixels)
        latents = np.asarray(sd.scale_latents(jnp.asarray(mean.reshape(-1, *mean.shape[2:]))))
        if runs[0].concepts[token].per_image_captions:  # every view of image i goes with caption i
            prompts = tuple(p for p in prompts for _ in range(pixels.shape[1]))
        losses = candidate_losses(sd, placeholders, [r.learned[token] for r in runs], latents, prompts,
                                  repeats=repeats, seed=seed, loss=loss)
        best = int(np.argmin(losses))
        picked.append(runs[best].learned[token])
        summary["concepts"][token] = {"picked": str(runs[best].folder),
                                      "losses": {str(r.folder): float(x) for r, x in zip(runs, losses, strict=True)}}
    write_embeddings(out, picked)
    fs.write_text(out / "pick.json", json.dumps(summary, indent=2) + "\n")
    return summary
