"""Can the training objective tell which of several runs learned a concept best? For every concept that each of
the given toy-world benchmark runs learned with one vector, the diffusion loss of each run's vector on the concept's
own training images (and their mirror images) under one fixed set of noise and timesteps, the same for every
candidate, so a difference is the vectors' and not the draws'. The lowest loss is the pick; the table sets its
scores beside the first run's, the best-scored candidate's and the long caption's (reconstruction / editability).

    python benchmarks/toyworld_pick.py RUN RUN [...]   # folders benchmarks/toyworld.py wrote with --out

The runs must share the concept draw and images (the same --draw/--concepts, --seed and --images); they may differ
in anything else (learning rate, --set fields). Each run must have its `tix-1v` vectors and their scores.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import tix  # noqa: E402
from benchmarks import toyworld as bench  # noqa: E402
from train.config import load_config  # noqa: E402
from train.step import diffusion_loss  # noqa: E402

SHARED_ARGS = ("model", "concepts", "draw", "seed", "images", "shared")
BUCKETS = 10  # timesteps are drawn evenly from each tenth of the schedule, so no range is missed by chance
PLACEHOLDER = "<candidate>"


def read_run(folder: Path) -> tuple[dict, dict, dict]:
    """(the run's benchmark args, its learned tix-1v vectors by concept, its tix-1v scores by concept)."""
    results = json.loads((folder / "results.json").read_text())
    learned = bench._reused(folder / "runs" / "base" / "tokens")
    vectors = {name: v for (name, method), v in learned.items() if method == "tix-1v"}
    scores = {key.split("|")[0]: s for key, s in results["per_concept"].items() if key.endswith("|tix-1v")}
    return results["args"], vectors, scores


def training_latents(sd, folder: Path) -> jax.Array:
    """The concept's training images and their mirror images (training flips them), as scaled latent means."""
    images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.glob("*.png"))])
    images = np.concatenate([images, images[:, :, ::-1]])
    return sd.encode_images(images.astype(np.float32) / 127.5 - 1.0)


def fixed_draws(sd, x0: jax.Array, repeats: int, seed: int = 0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(latents, noise, timesteps): every image `repeats` times in each of `BUCKETS` timestep ranges."""
    total = sd.schedule.num_train_timesteps
    n = x0.shape[0] * repeats * BUCKETS
    latents = jnp.tile(x0, (repeats * BUCKETS, 1, 1, 1))
    bucket = jnp.repeat(jnp.arange(BUCKETS), x0.shape[0] * repeats)
    key_t, key_n = jax.random.split(jax.random.key(seed))
    within = jax.random.uniform(key_t, (n,))
    timesteps = ((bucket + within) * (total / BUCKETS)).astype(jnp.int32)
    return latents, jax.random.normal(key_n, latents.shape), timesteps


def candidate_losses(sd, vectors: list[dict], x0: jax.Array, prompts: list[str], repeats: int) -> np.ndarray:
    """The mean fixed-draw loss of each candidate's vectors (one dict of [1, D] arrays per text encoder)."""
    latents, noise, timesteps = fixed_draws(sd, x0, repeats)
    ids = sd.tokenize([prompts[i % len(prompts)].format(PLACEHOLDER) for i in range(latents.shape[0])])
    loss = jax.jit(lambda rows: diffusion_loss(sd, sd.params, rows, latents, noise, timesteps, ids).mean())
    return np.array([float(loss(tuple(jnp.asarray(v[side.name]) for side in sd.text))) for v in vectors])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="benchmark output folders (--out), at least two")
    p.add_argument("--repeats", type=int, default=8, help="draws per image and timestep range (default 8)")
    args = p.parse_args(argv)
    if len(args.runs) < 2:
        p.error("give at least two runs to choose between")
    runs = [read_run(folder) for folder in args.runs]
    for folder, (run_args, _, _) in zip(args.runs[1:], runs[1:], strict=True):
        differ = [k for k in SHARED_ARGS if run_args.get(k) != runs[0][0].get(k)]
        if differ:
            p.error(f"{folder} drew different concepts or images from {args.runs[0]} ({', '.join(differ)} differ)")
    names = [n for n in runs[0][2] if all(n in vectors and n in scores for _, vectors, scores in runs)]
    if not names:
        p.error("the runs share no concept learned with tix-1v and scored")
    results = json.loads((args.runs[0] / "results.json").read_text())
    nameable = {n: not c["unnamed"] for n, c in results["concepts"].items()}
    sd = tix.load(runs[0][0]["model"])
    sd.add_tokens(PLACEHOLDER, [None] * len(sd.text))
    prompts = list(load_config(ROOT / "configs" / "toyworld.yaml").prompts)

    rows = {"first": [], "picked": [], "best-scored": [], "caption-long": []}
    groups = []
    for name in names:
        x0 = training_latents(sd, args.runs[0] / "data" / "base" / f"{name}@tix-1v")
        losses = candidate_losses(sd, [vectors[name] for _, vectors, _ in runs], x0, prompts, args.repeats)
        scores = [(s[name]["reconstruction"], s[name]["editability"]) for _, _, s in runs]
        pick = int(np.argmin(losses))
        rows["first"].append(scores[0])
        rows["picked"].append(scores[pick])
        rows["best-scored"].append(max(scores, key=sum))
        caption = results["per_concept"][f"{name}|caption-long"]
        rows["caption-long"].append((caption["reconstruction"], caption["editability"]))
        groups.append("named" if nameable[name] else "unnamed")
        print(f"{name}: losses " + " ".join(f"{x:.5f}" for x in losses) + "  scores "
              + " ".join(f"{r:.2f}/{e:.2f}" for r, e in scores) + f"  pick {pick}", flush=True)
    print("\n| group | concepts | first run | picked by loss | best-scored | caption-long |\n|---|---|---|---|---|---|")
    for group in ("named", "unnamed"):
        mask = np.array(groups) == group
        if mask.any():
            cells = [np.asarray(rows[k])[mask].mean(0) for k in rows]
            print(f"| {group} | {mask.sum()} | " + " | ".join(f"{r:.2f} / {e:.2f}" for r, e in cells) + " |")


if __name__ == "__main__":
    main()
