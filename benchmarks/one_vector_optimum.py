"""Is one vector's shortfall on a toy-world concept the optimiser's or the objective's?

For each concept of a toy-world benchmark draw, one vector is fitted with Adam on a fixed set of draws (images,
timesteps, noise, prompts), the whole set as one batch, so no sampling noise steers it, from several starts, until
the loss stops moving. Printed: each converged vector's diffusion loss per tenth of the schedule on held-out draws,
beside the long caption's on the same draws, and its reconstruction / editability scored as `benchmarks/toyworld.py`
scores tokens (same prompts and sampling noise); with --balanced, the loss fitted is the one
`--set balance_noise_levels=true` trains on. If every start reaches the same loss, above the caption's, and that
vector still misses the concept, no optimiser setting will find a better one: the plain loss's one-vector minimum
is what misses it.

    python benchmarks/one_vector_optimum.py yellow_dotted_star --draw 32 --seed 4 [--steps 100] [--lr 0.03]
    python benchmarks/one_vector_optimum.py yellow_dotted_star blue_dotted_square --steps 0 --unfitted   # the starts

The images are those `benchmarks/toyworld.py --draw 32 --seed 4` trains on. About 3 minutes per start on 2 cores. Named
concepts only: the starts are the words that name them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from safetensors.numpy import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tix  # noqa: E402
from benchmarks import toyworld as bench  # noqa: E402
from tix import schedule as sched  # noqa: E402
from tix import templates  # noqa: E402
from tix.pipeline import StableDiffusion  # noqa: E402
from tix.toyworld import evaluate, world  # noqa: E402
from train.invert import init_vectors  # noqa: E402
from train.step import diffusion_loss  # noqa: E402

LEVELS = 10
PLACEHOLDER = "<probe>"  # the token whose row the fitted vector is, in the loss's prompts
CHUNK = 80  # samples per forward pass: keeps a 2-core machine's memory small


class Draws(NamedTuple):
    x0: jax.Array  # scaled latents [S, h, w, c]
    noise: jax.Array
    t: jax.Array  # [S]
    prompt: list[str]  # templates, "{}" for the phrase
    level: np.ndarray  # [S] tenth of the schedule


def fixed_draws(latents: np.ndarray, per_level: int, seed: int, num_train_timesteps: int) -> Draws:
    """`per_level` draws in each tenth of the schedule, each of a random training image, noise and paper template."""
    rng = np.random.default_rng(seed)
    level = np.repeat(np.arange(LEVELS), per_level)
    t = sched.level_timesteps(jnp.asarray(level), jnp.asarray(rng.random(level.size)), LEVELS, num_train_timesteps)
    image = rng.integers(len(latents), size=level.size)
    noise = rng.standard_normal((level.size, *latents.shape[1:])).astype(np.float32)
    prompt = [templates.OBJECT[i] for i in rng.integers(len(templates.OBJECT), size=level.size)]
    return Draws(jnp.asarray(latents[image]), jnp.asarray(noise), t, prompt, level)


def _chunks(sd: StableDiffusion, draws: Draws, phrase: str):
    for s in range(0, len(draws.prompt), CHUNK):
        ids = tuple(map(jnp.asarray, sd.tokenize([p.format(phrase) for p in draws.prompt[s:s + CHUNK]])))
        yield draws.x0[s:s + CHUNK], draws.noise[s:s + CHUNK], draws.t[s:s + CHUNK], ids


def loss_per_tenth(sd: StableDiffusion, loss, vector: jax.Array, draws: Draws, phrase: str) -> np.ndarray:
    """[LEVELS] mean diffusion loss of `phrase` (which may hold the placeholder that reads `vector`)."""
    per_sample = np.concatenate([np.asarray(loss(vector, *chunk)) for chunk in _chunks(sd, draws, phrase)])
    return np.array([per_sample[draws.level == k].mean() for k in range(LEVELS)])


def fit(sd: StableDiffusion, loss, start: np.ndarray, draws: Draws, steps: int, lr: float,
        weight: jax.Array | None = None) -> tuple[np.ndarray, list]:
    """Adam (cosine-decayed rate) on the mean loss over all of `draws` at every step, each sample's loss times
    its `weight` [S] if given; returns the vector and (step, loss) every 25 steps."""
    weight = jnp.ones(len(draws.prompt)) if weight is None else weight
    grad = jax.jit(jax.value_and_grad(lambda v, w, *chunk: (w * loss(v, *chunk)).sum()))
    chunks = [(weight[s:s + CHUNK], *chunk) for s, chunk in zip(range(0, len(draws.prompt), CHUNK),
                                                                 _chunks(sd, draws, PLACEHOLDER), strict=True)]
    opt = optax.adam(optax.cosine_decay_schedule(lr, steps))
    v = jnp.asarray(start)
    state = opt.init(v)
    curve, n = [], len(draws.prompt)
    for step in range(steps):
        total, g = 0.0, jnp.zeros_like(v)
        for chunk in chunks:
            value, g_chunk = grad(v, *chunk)
            total, g = total + float(value), g + g_chunk
        updates, state = opt.update(g / n, state, v)
        v = optax.apply_updates(v, updates)
        if step % 25 == 0 or step == steps - 1:
            curve.append((step, total / n))
    return np.asarray(v), curve


def starts(sd: StableDiffusion, concept: world.Concept) -> dict[str, np.ndarray]:
    """The paper's start (the shape word), the mean of the words that name the concept, and the colour word alone,
    as `tix invert --init` would start one vector from them."""
    f = concept.fixed
    words = {concept.initializer: concept.initializer,
             f"mean({f['colour']} {f['pattern']} {f['shape']})": f"{f['colour']} {f['pattern']} {f['shape']}",
             f["colour"]: f["colour"]}
    return {name: init_vectors(sd, init, 1)[0] for name, init in words.items()}


def probe(sd: StableDiffusion, concept: world.Concept, image_seed: int, score_seed: int,
          args: argparse.Namespace) -> dict:
    """Every start's fit and every `--also` vector, measured: {name: held-out loss per tenth, norm, vector, scores,
    and for fits the loss curve}; "caption" holds the caption's held-out loss."""
    pixels = world.concept_images(concept, args.images, image_seed)
    latents = np.asarray(sd.encode_images(pixels.astype(np.float32) / 127.5 - 1.0))
    total = sd.schedule.num_train_timesteps
    train_draws = fixed_draws(latents, args.per_level, 1, total)
    held = fixed_draws(latents, args.per_level, 2, total)
    loss = jax.jit(lambda v, x0, noise, t, ids: diffusion_loss(sd, sd.params, (v,), x0, noise, t, ids))
    caption = concept.best_caption()
    out = {"caption": {"held": loss_per_tenth(sd, loss, jnp.zeros((1, sd.text[0].width)), held, caption).tolist()}}
    print(f"{concept.name}: caption {caption!r} held-out loss {np.mean(out['caption']['held']):.5f}", flush=True)

    def generate(prompts: list[str], seed: int) -> np.ndarray:
        return np.asarray(sd.generate(prompts, seed=seed, **bench.SAMPLING))

    def measure(name: str, vector: np.ndarray, **extra) -> None:
        held_loss = loss_per_tenth(sd, loss, jnp.asarray(vector), held, PLACEHOLDER)
        token = f"<{concept.name}-{len(out)}>"
        sd.add_tokens(token, [vector])
        score = evaluate.score_phrase(generate, concept, token, samples=args.samples, seed=score_seed)
        out[name] = {"held": held_loss.tolist(), "norm": float(np.linalg.norm(vector)), "vector": vector.tolist(),
                     "reconstruction": score.reconstruction, "editability": score.editability, **extra}
        fitted = f"fitted loss {extra['curve'][-1][1]:.5f} (step {extra['curve'][-1][0]}), " if extra else ""
        print(f"  {name}: {fitted}held-out {held_loss.mean():.5f}, norm {out[name]['norm']:.2f}; reconstruction "
              f"{score.reconstruction:.2f}, editability {score.editability:.2f}", flush=True)

    for path in args.also:  # vectors trained elsewhere (a diffusers-format file), measured on the same draws
        measure(path.stem, next(iter(load_file(path).values())).reshape(1, -1))
    for name, start in starts(sd, concept).items():
        if args.unfitted:
            measure(f"start {name}", start)
        if not args.steps:
            continue
        began = time.time()
        weight = None
        if args.balanced:  # the weighting of `--set balance_noise_levels=true`, from the start's loss per tenth
            reference = loss_per_tenth(sd, loss, jnp.asarray(start), train_draws, PLACEHOLDER)
            weight = sched.balanced_level_weight(jnp.asarray(reference)[None], train_draws.t, total)
        vector, curve = fit(sd, loss, start, train_draws, args.steps, args.lr, weight)
        measure(f"fitted from {name}", vector, curve=curve, seconds=time.time() - began)
    return out


def table(results: dict[str, dict]) -> str:
    """Per concept and vector: held-out loss over the caption's (all tenths, the noisiest three), scores."""
    lines = ["| concept | vector | fitted loss, last change | held-out loss / caption's "
             "| noisiest 3 tenths / caption's | norm | reconstruction | editability |", "|---" * 8 + "|"]
    for concept, runs in results.items():
        cap = np.asarray(runs["caption"]["held"])
        for name, r in runs.items():
            if name != "caption":
                held = np.asarray(r["held"])
                fitted = "-"
                if "curve" in r:
                    (_, before), (_, last) = r["curve"][-2:]
                    fitted = f"{last:.5f}, {last - before:+.1e}"
                lines.append(f"| {concept} | {name} | {fitted} | "
                             f"{held.mean() / cap.mean():.4f} | {held[-3:].mean() / cap[-3:].mean():.3f} | "
                             f"{r['norm']:.2f} | {r['reconstruction']:.2f} | {r['editability']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="+", help="concepts of the draw, e.g. yellow_dotted_star")
    p.add_argument("--draw", type=int, default=32)
    p.add_argument("--seed", type=int, default=4)
    p.add_argument("--images", type=int, default=5)
    p.add_argument("--per-level", type=int, default=24, help="fitted draws per tenth of the schedule")
    p.add_argument("--steps", type=int, default=100, help="0: fit nothing")
    p.add_argument("--unfitted", action="store_true",
                   help="also measure each start as it is (the words' mean is what stage 3 of the toy model's "
                        "training teaches its text encoder to read)")
    p.add_argument("--model", default="toyworld", help="the toy model (a folder), e.g. an earlier one to compare")
    p.add_argument("--lr", type=float, default=0.03)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--balanced", action="store_true",
                   help="fit the balanced-noise-levels loss (balance_noise_levels) instead of the plain one")
    p.add_argument("--also", type=Path, nargs="*", default=[],
                   help="learned_embeds.safetensors files of one concept (give one name) to measure beside the fits")
    p.add_argument("--out", type=Path, default=None, help="folder for results.json and table.md")
    args = p.parse_args()
    concepts = world.sample_concepts(args.draw // 2, args.draw - args.draw // 2, args.seed)
    seeds = bench.concept_seeds(concepts, args.seed)
    by_name = {c.name: c for c in concepts}
    if args.also and len(args.names) != 1:
        raise SystemExit("--also measures vectors of one concept: name exactly one")
    unknown = sorted(set(args.names) - set(by_name))
    if unknown:
        raise SystemExit(f"not in the draw (--draw {args.draw} --seed {args.seed}): {', '.join(unknown)}")
    unnamed = [name for name in args.names if not by_name[name].nameable]
    if unnamed:
        raise SystemExit(f"{', '.join(unnamed)}: no words name these concepts, so there is no caption to compare "
                         "with or words to start from; give named concepts")
    sd = tix.load(args.model)
    sd.add_tokens(PLACEHOLDER, [None] * len(sd.text))
    results = {name: probe(sd, by_name[name], seeds[name], args.seed, args) for name in args.names}
    print(table(results))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                           "results": results}, indent=1))
        (args.out / "table.md").write_text(table(results) + "\n")


if __name__ == "__main__":
    main()
