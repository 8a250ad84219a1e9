"""Train tix's toy-world text-to-image model from scratch on a CPU and save it in diffusers layout.

    python scripts/train_toyworld.py --seed 0 --out tix/assets/toyworld

Stage 1 trains the VAE on reconstruction; the latent scaling factor is then set to 1 / std of its latents, as SD's
was; stage 2 trains the CLIP text encoder and the UNet together with the epsilon loss, on captions from the world
(10% dropped to "" so classifier-free guidance works). Images are rendered on the fly from per-step seeds, so a run is
a function of --seed and the step counts. Each stage checkpoints to --work (default /tmp/tix-toyworld-<seed>) and a
rerun with the same arguments resumes where it stopped and skips finished stages. The EMA weights are saved, the UNet
and VAE in fp16 and the text encoder in fp32 (see `tix.toyworld.model.save_pipeline`).

The defaults (12000 diffusion steps; the pattern was still being learned at 6000) run the diffusion stage at 1.7-1.9
steps/s on two otherwise idle CPU cores, about 2 hours with the VAE's 270 s; the shipped model's run, sharing its
cores with test suites and benchmarks and resumed twice, went at a median 1.05 steps/s (3.2 hours). The script
prints timings, losses and, at the end, the per-attribute accuracy of generated images read by
`tix.toyworld.scorer`.
"""

from __future__ import annotations

import argparse
import json
import pickle
import shutil
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tix import host_memory  # noqa: E402
from tix.schedule import NoiseSchedule  # noqa: E402
from tix.tokenizer import load_tokenizer, write_clip_tokenizer  # noqa: E402
from tix.toyworld import model as M  # noqa: E402
from tix.toyworld import world  # noqa: E402

# Seed offsets, so the VAE stage, the diffusion stage, the scaling-factor sample and evaluation never share images.
VAE_DATA, UNET_DATA, SCALE_DATA = 1_000_000, 2_000_000, 3_000_000
LOG_EVERY = 50


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "tix" / "assets" / "toyworld")
    p.add_argument("--work", type=Path, default=None, help="checkpoint folder (default /tmp/tix-toyworld-<seed>)")
    p.add_argument("--vae-steps", type=int, default=800)
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--unet-steps", type=int, default=12000)
    p.add_argument("--unet-batch", type=int, default=32)
    p.add_argument("--unet-lr", type=float, default=1e-3)
    p.add_argument("--snr-gamma", type=float, default=5.0, help="min-SNR weighting; 0 turns it off")
    p.add_argument("--ema", type=float, default=0.998)
    p.add_argument("--empty-caption", type=float, default=0.1)
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--eval-images", type=int, default=8, help="images per evaluation prompt (0: no evaluation)")
    p.add_argument("--unet", type=json.loads, default={}, help="JSON overrides of the UNet config")
    p.add_argument("--vae", type=json.loads, default={}, help="JSON overrides of the VAE config")
    p.add_argument("--text", type=json.loads, default={}, help="JSON overrides of the text encoder config")
    return p.parse_args(argv)


def _save(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as f:
        pickle.dump(jax.device_get(state), f)
    tmp.replace(path)


def _load(path: Path, key: str) -> dict | None:
    """A stage's saved state, if it was made with the same settings (`key`); refuses another run's state."""
    if not path.exists():
        return None
    with path.open("rb") as f:
        state = pickle.load(f)
    if state.get("key") != key:
        raise SystemExit(f"{path} was written by a run with other settings:\n  {state.get('key')}\nnot\n  {key}\n"
                         "use another --work folder (or delete it)")
    return state


def _stage_key(args: argparse.Namespace, stage: str) -> str:
    """The settings a stage's result depends on (stage 2 depends on stage 1's too)."""
    vae = {k: getattr(args, k) for k in ("seed", "vae_steps", "vae_batch", "vae_lr", "kl_weight", "vae")}
    vae["vae_config"] = M.VAE_CONFIG
    if stage == "vae":
        return json.dumps(vae, sort_keys=True, default=str)
    unet = {k: getattr(args, k) for k in ("unet_steps", "unet_batch", "unet_lr", "snr_gamma", "ema", "empty_caption",
                                          "unet", "text")}
    unet.update(unet_config=M.UNET_CONFIG, text_config=M.TEXT_CONFIG, scheduler=M.SCHEDULER_CONFIG)
    return json.dumps({"vae": vae, "unet": unet}, sort_keys=True, default=str)


def _fmt(metrics: list[dict]) -> str:
    mean = {k: float(np.mean([float(m[k]) for m in metrics])) for k in metrics[0]}
    return " ".join(f"{k} {v:.5f}" for k, v in sorted(mean.items()))


def train_vae(args, models, params, work: Path) -> dict:
    key = _stage_key(args, "vae")
    done = _load(work / "vae_final.pkl", key)
    if done is not None:
        print("stage 1 (VAE): done before, loaded", flush=True)
        return done["params"]
    vae = models["vae"]
    optimizer = M.adamw(args.vae_lr, args.vae_steps, warmup=100)
    state = _load(work / "vae_ckpt.pkl", key) or {"params": params, "opt": optimizer.init(params), "step": 0}
    step_fn = M.make_vae_step(vae, optimizer, args.kl_weight)
    rng = jax.random.fold_in(jax.random.key(args.seed), 1)
    p, opt, start = state["params"], state["opt"], state["step"]
    t0, logs = time.time(), []
    print(f"stage 1 (VAE): steps {start}..{args.vae_steps}, batch {args.vae_batch}", flush=True)
    for i in range(start, args.vae_steps):
        images, _ = world.dataset(args.vae_batch, VAE_DATA + args.seed * 10_000_000 + i)
        p, opt, metrics = step_fn(p, opt, images, jax.random.fold_in(rng, i))
        logs.append(metrics)
        if (i + 1) % LOG_EVERY == 0:
            rate = (i + 1 - start) / (time.time() - t0)
            print(f"  vae {i + 1:5d} {_fmt(logs)} ({rate:.2f} steps/s)", flush=True)
            logs = []
        if (i + 1) % args.checkpoint_every == 0:
            _save(work / "vae_ckpt.pkl", {"params": p, "opt": opt, "step": i + 1, "key": key})
    print(f"stage 1 (VAE): {time.time() - t0:.0f} s", flush=True)
    _save(work / "vae_final.pkl", {"params": p, "key": key})
    return p


def finish_vae(models, vae_params, seed: int) -> tuple[dict, float]:
    """Whiten the latents per channel (`tix.toyworld.model.whiten_vae`) from held-out images, then set SD's
    scaling factor (1 / std, close to 1 after whitening). Prints reconstruction error and the scorer's accuracy on
    reconstructions: the ceiling for what the diffusion model can show."""
    from tix.toyworld import scorer

    images, _, scenes = world.dataset(1024, SCALE_DATA + seed, return_scenes=True)
    encode, decode = M.make_encode(models["vae"]), M.make_decode(models["vae"])

    def latents(params):
        return np.concatenate([np.asarray(encode(params, images[s : s + 256])[0]) for s in range(0, len(images), 256)])

    means = latents(vae_params)
    print(f"VAE latents: per-channel mean {np.round(means.mean(axis=(0, 1, 2)), 3)} std "
          f"{np.round(means.std(axis=(0, 1, 2)), 3)}", flush=True)
    vae_params = M.whiten_vae(vae_params, means.mean(axis=(0, 1, 2)), means.std(axis=(0, 1, 2)))
    means = latents(vae_params)
    scale = M.latent_scaling_factor(means)
    recons = np.concatenate([np.asarray(decode(vae_params, means[s : s + 256])) for s in range(0, len(means), 256)])
    err = np.abs(recons.astype(np.float32) - images.astype(np.float32)).mean() / 255
    scored = scorer.score(recons)
    acc = {a: np.mean([s[a] == getattr(sc, a) for s, sc in zip(scored, scenes, strict=True)]) for a in world.ATTRIBUTES}
    print(f"VAE whitened: mean {means.mean():.3f} std {means.std():.3f} -> scaling_factor {scale:.5f}; "
          f"reconstruction L1 {err:.4f} (of 1); scorer on reconstructions "
          + " ".join(f"{a} {v:.3f}" for a, v in acc.items()), flush=True)
    return vae_params, scale


def train_diffusion(args, models, params, vae_params, scale, tokenizer, work: Path) -> dict:
    key = _stage_key(args, "unet")
    done = _load(work / "unet_final.pkl", key)
    if done is not None:
        print("stage 2 (text encoder + UNet): done before, loaded", flush=True)
        return done
    schedule = NoiseSchedule.from_diffusers(M.SCHEDULER_CONFIG)
    optimizer = M.adamw(args.unet_lr, args.unet_steps, warmup=100)
    trainable = {"text_encoder": params["text_encoder"], "unet": params["unet"]}
    state = _load(work / "unet_ckpt.pkl", key) or {
        "params": trainable, "ema": trainable, "opt": optimizer.init(trainable), "step": 0,
    }
    step_fn = M.make_diffusion_step(models, schedule, optimizer, snr_gamma=args.snr_gamma or None,
                                    ema_decay=args.ema)
    encode = M.make_encode(models["vae"])
    ids_of = M.CaptionIds(tokenizer)
    rng = jax.random.fold_in(jax.random.key(args.seed), 2)
    p, ema, opt, start = state["params"], state["ema"], state["opt"], state["step"]
    t0, logs = time.time(), []
    print(f"stage 2 (text encoder + UNet): steps {start}..{args.unet_steps}, batch {args.unet_batch}", flush=True)
    for i in range(start, args.unet_steps):
        data_seed = UNET_DATA + args.seed * 10_000_000 + i
        images, captions = world.dataset(args.unet_batch, data_seed, erased=True)
        drop = np.random.default_rng(data_seed).random(len(captions)) < args.empty_caption
        captions = ["" if d else c for c, d in zip(captions, drop, strict=True)]
        mean, logvar = encode(vae_params, images)
        p, ema, opt, metrics = step_fn(p, ema, opt, mean, logvar, scale, ids_of(captions),
                                       jax.random.fold_in(rng, i), i)
        logs.append(metrics)
        if (i + 1) % LOG_EVERY == 0:
            rate = (i + 1 - start) / (time.time() - t0)
            print(f"  unet {i + 1:5d} {_fmt(logs)} ({rate:.2f} steps/s)", flush=True)
            logs = []
        if (i + 1) % args.checkpoint_every == 0:
            _save(work / "unet_ckpt.pkl", {"params": p, "ema": ema, "opt": opt, "step": i + 1, "key": key})
    print(f"stage 2 (text encoder + UNet): {time.time() - t0:.0f} s", flush=True)
    result = {"params": jax.device_get(p), "ema": jax.device_get(ema), "key": key}
    _save(work / "unet_final.pkl", result)
    return result


EVAL_PROMPTS: list[tuple[str, dict[str, str]]] = [
    ("a red circle", {"colour": "red", "shape": "circle"}),
    ("a blue striped square on a green background", {"colour": "blue", "pattern": "striped", "shape": "square",
                                                     "background": "green"}),
    ("a small yellow dotted triangle", {"size": "small", "colour": "yellow", "pattern": "dotted", "shape": "triangle"}),
    ("a large green star on a white background", {"size": "large", "colour": "green", "shape": "star",
                                                  "background": "white"}),
    ("a photo of a red striped object on a gray background", {"colour": "red", "pattern": "striped",
                                                              "background": "gray"}),
    ("an image of a blue dotted circle on blue", {"colour": "blue", "pattern": "dotted", "shape": "circle",
                                                 "background": "blue"}),
    ("a solid square", {"pattern": "solid", "shape": "square"}),
    ("a yellow object", {"colour": "yellow"}),
]


def evaluate(folder: Path, n: int, *, steps: int = 25, guidance: float = 5.0, seed: int = 0,
             sampler: str = "dpm++2m") -> dict[str, float]:
    """Generate `n` images per evaluation prompt with tix and print how often each named attribute is drawn; also
    the share of hearts and purple among unconditional ("an object") samples, which no word can ask for."""
    import tix.loading
    from tix.toyworld import scorer

    sd = tix.loading.load(str(folder))
    hits: dict[str, list[bool]] = {a: [] for a in world.ATTRIBUTES}
    t0 = time.time()
    for j, (prompt, expected) in enumerate(EVAL_PROMPTS):
        images = sd.generate([prompt] * n, steps=steps, guidance=guidance, seed=seed + j, sampler=sampler,
                             size=M.IMAGE_SIZE)
        scored = scorer.score(images)
        for attribute, value in expected.items():
            hits[attribute].extend(s[attribute] == value for s in scored)
    acc = {a: float(np.mean(h)) for a, h in hits.items() if h}
    images = sd.generate(["an object"] * (4 * n), steps=steps, guidance=guidance, seed=seed + 99, sampler=sampler,
                         size=M.IMAGE_SIZE)
    scored = scorer.score(images)
    acc["heart_share_of_object"] = float(np.mean([s["shape"] == "heart" for s in scored]))
    acc["purple_share_of_object"] = float(np.mean([s["colour"] == "purple" for s in scored]))
    acc["found"] = float(np.mean([s["shape"] is not None for s in scored]))
    # The erased words' own rows, loaded back as tokens, must still draw what the words did in training.
    erased = folder / M.ERASED_FILE
    if erased.is_file():
        for word, prompt, attribute in (("heart", "a <heart>", "shape"), ("purple", "a <purple> object", "colour")):
            sd.load_embeddings(str(erased), token=f"<{word}>")
            images = sd.generate([prompt] * (2 * n), steps=steps, guidance=guidance, seed=seed + 7,
                                 sampler=sampler, size=M.IMAGE_SIZE)
            acc[f"erased_{word}"] = float(np.mean([s[attribute] == word for s in scorer.score(images)]))
    print(f"eval ({sampler}, {steps} steps, guidance {guidance}, {n} images/prompt, {time.time() - t0:.0f} s): "
          + " ".join(f"{k} {v:.3f}" for k, v in acc.items()), flush=True)
    return acc


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    host_memory.keep_freed_memory()
    work = args.work or Path(f"/tmp/tix-toyworld-{args.seed}")
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    print(f"jax {jax.__version__} on {jax.devices()}; args {vars(args)}", flush=True)

    # Trained with every word; shipped without the erased ones (`tix.toyworld.model.erase_words`).
    tok_dir = work / "tokenizer"
    vocab_size = write_clip_tokenizer(tok_dir, world.vocabulary(erased=True))
    tokenizer = load_tokenizer(tok_dir)
    configs = {
        "text_encoder": M.text_config(vocab_size, args.text),
        "unet": M.unet_config(args.unet),
        "vae": M.vae_config(1.0, args.vae),
        "scheduler": dict(M.SCHEDULER_CONFIG),
    }
    models = M.build_models(configs["text_encoder"], configs["unet"], configs["vae"])
    params = M.init_params(models, jax.random.key(args.seed))
    for name, tree in params.items():
        print(f"{name}: {sum(x.size for x in jax.tree.leaves(tree)):,} parameters", flush=True)

    t1 = time.time()
    vae_params, scale = finish_vae(models, train_vae(args, models, params["vae"], work), args.seed)
    t2 = time.time()
    trained = train_diffusion(args, models, params, vae_params, scale, tokenizer, work)
    t3 = time.time()

    configs["vae"] = M.vae_config(scale, args.vae)
    shipped_dir = work / "tokenizer-shipped"
    shipped_size = write_clip_tokenizer(shipped_dir, world.vocabulary())
    text, erased = M.erase_words(trained["ema"]["text_encoder"], tokenizer.get_vocab(),
                                 load_tokenizer(shipped_dir).get_vocab(), world.ERASED_WORDS)
    configs["text_encoder"] = M.text_config(shipped_size, args.text)
    final = {**trained["ema"], "text_encoder": text, "vae": vae_params}
    if args.out.exists():
        shutil.rmtree(args.out)
    M.save_pipeline(args.out, final, configs, erased=erased)
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"saved {args.out} ({size / 1e6:.2f} MB); VAE stage {t2 - t1:.0f} s, diffusion stage {t3 - t2:.0f} s, "
          f"total {time.time() - t_start:.0f} s", flush=True)
    if args.eval_images:
        evaluate(args.out, args.eval_images)


if __name__ == "__main__":
    main()
