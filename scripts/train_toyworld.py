"""Train tix's toy-world text-to-image model from scratch on a CPU and save it in diffusers layout.

    python scripts/train_toyworld.py --seed 0 --out tix/assets/toyworld

Stage 1 trains the VAE on reconstruction; the latent scaling factor is then set to 1 / std of its latents, as SD's
was; stage 2 trains the CLIP text encoder and the UNet together with the epsilon loss, on captions from the world
(10% dropped to "" so classifier-free guidance works). Stage 3 continues stage 2 with 30% of the captions' noun
phrases fed as one blended word (one position holding the mean of the words' token rows, `world.blend_noun`), so
the text encoder learns what a real one knows from words like "ladybug": that one input vector can carry colour,
pattern and shape at once. Images are rendered on the fly from per-step seeds, so a run is a function of --seed and
the step counts. Each stage checkpoints to --work (default /tmp/tix-toyworld-<seed>) and a rerun with the same
arguments resumes where it stopped and skips finished stages. The EMA weights are saved, the UNet and VAE in fp16
and the text encoder in fp32 (see `tix.toyworld.model.save_pipeline`).

`--from-pipeline FOLDER` takes stages 1 and 2 from a saved model instead (its erased rows put back into the token
table) and runs stage 3 on it: that is how the shipped model was made from the one shipped before stage 3 existed.

With the defaults (12000 diffusion steps; the pattern was still being learned at 6000) one run of all three stages
on two otherwise idle CPU cores took 1 hour 34 minutes: the VAE 191 s, stage 2 at about 2.5 steps/s (81 minutes),
stage 3 at 2.6 steps/s (10 minutes). Its model matches the shipped one to within fp16 rounding (README). The
shipped model's stage 2, sharing its cores with test suites and benchmarks and resumed twice, went at a median 1.05
steps/s (3.2 hours); its stage 3 took 13 minutes beside a benchmark. The script prints timings, losses and, at the
end, the per-attribute accuracy of generated images read by `tix.toyworld.scorer`.
"""

from __future__ import annotations

import argparse
import json
import pickle
import shutil
import sys
import time
from dataclasses import dataclass
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
VAE_DATA, UNET_DATA, SCALE_DATA, BLEND_DATA = 1_000_000, 2_000_000, 3_000_000, 4_000_000
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
    p.add_argument("--blend-steps", type=int, default=1500, help="stage 3's steps (0: no stage 3)")
    p.add_argument("--blend-lr", type=float, default=2e-4)
    p.add_argument("--blend-share", type=float, default=0.3,
                   help="share of stage 3's captions whose noun phrase is one blended word")
    p.add_argument("--from-pipeline", type=Path, default=None, metavar="FOLDER",
                   help="take stages 1 and 2 from this saved model (e.g. a copy of the shipped one) and run stage 3")
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
    if stage == "unet":
        return json.dumps({"vae": vae, "unet": unet}, sort_keys=True, default=str)
    blend = {k: getattr(args, k) for k in ("blend_steps", "blend_lr", "blend_share", "ema")}
    base = str(args.from_pipeline) if args.from_pipeline else {"vae": vae, "unet": unet}
    return json.dumps({"base": base, "blend": blend}, sort_keys=True, default=str)


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


@dataclass(frozen=True)
class Stage:
    """A diffusion stage's settings: stage 2 learns the words, stage 3 blended noun phrases."""

    name: str  # its checkpoint files and settings key
    title: str
    steps: int
    lr: float
    warmup: int
    data: int  # seed offset of its images
    stream: int  # its random stream (noise, timesteps)
    blend_share: float
    ema_warmup: bool  # False: the average starts from the stage's start, not from scratch


def stages(args: argparse.Namespace) -> tuple[Stage, Stage]:
    return (Stage("unet", "stage 2 (text encoder + UNet)", args.unet_steps, args.unet_lr, 100, UNET_DATA, 2, 0.0,
                  True),
            Stage("blend", "stage 3 (blended noun phrases)", args.blend_steps, args.blend_lr, 50, BLEND_DATA, 3,
                  args.blend_share, False))


def training_captions(captions: list[str], data_seed: int, empty: float, blend_share: float) -> list[str]:
    """A batch's captions as trained on: some dropped to "" (for classifier-free guidance), some blended."""
    drop = np.random.default_rng(data_seed).random(len(captions)) < empty
    captions = ["" if d else c for c, d in zip(captions, drop, strict=True)]
    if not blend_share:
        return captions
    fuse = np.random.default_rng((data_seed, 1)).random(len(captions)) < blend_share
    return [world.blend_noun(c) if f else c for c, f in zip(captions, fuse, strict=True)]


def train_diffusion(args, stage: Stage, models, trainable, vae_params, scale, tokenizer, work: Path) -> dict:
    """Train the text encoder and UNet from `trainable` through `stage`; resumes from and writes its checkpoints."""
    key = _stage_key(args, stage.name)
    done = _load(work / f"{stage.name}_final.pkl", key)
    if done is not None:
        print(f"{stage.title}: done before, loaded", flush=True)
        return done
    schedule = NoiseSchedule.from_diffusers(M.SCHEDULER_CONFIG)
    optimizer = M.adamw(stage.lr, stage.steps, warmup=stage.warmup)
    state = _load(work / f"{stage.name}_ckpt.pkl", key) or {
        "params": trainable, "ema": trainable, "opt": optimizer.init(trainable), "step": 0,
    }
    step_fn = M.make_diffusion_step(models, schedule, optimizer, snr_gamma=args.snr_gamma or None,
                                    ema_decay=args.ema)
    encode = M.make_encode(models["vae"])
    # A blended noun phrase holds at most the size, colour, pattern and shape words.
    ids_of = M.CaptionIds(tokenizer, parts=len(world.ATTRIBUTES) - 1 if stage.blend_share else 1)
    rng = jax.random.fold_in(jax.random.key(args.seed), stage.stream)
    p, ema, opt, start = state["params"], state["ema"], state["opt"], state["step"]
    t0, logs = time.time(), []
    print(f"{stage.title}: steps {start}..{stage.steps}, batch {args.unet_batch}", flush=True)
    for i in range(start, stage.steps):
        data_seed = stage.data + args.seed * 10_000_000 + i
        images, captions = world.dataset(args.unet_batch, data_seed, erased=True)
        captions = training_captions(captions, data_seed, args.empty_caption, stage.blend_share)
        mean, logvar = encode(vae_params, images)
        p, ema, opt, metrics = step_fn(p, ema, opt, mean, logvar, scale, ids_of(captions),
                                       jax.random.fold_in(rng, i), i if stage.ema_warmup else 10**9)
        logs.append(metrics)
        if (i + 1) % LOG_EVERY == 0:
            rate = (i + 1 - start) / (time.time() - t0)
            print(f"  {stage.name} {i + 1:5d} {_fmt(logs)} ({rate:.2f} steps/s)", flush=True)
            logs = []
        if (i + 1) % args.checkpoint_every == 0:
            _save(work / f"{stage.name}_ckpt.pkl", {"params": p, "ema": ema, "opt": opt, "step": i + 1, "key": key})
    print(f"{stage.title}: {time.time() - t0:.0f} s", flush=True)
    result = {"params": jax.device_get(p), "ema": jax.device_get(ema), "key": key}
    _save(work / f"{stage.name}_final.pkl", result)
    return result


def pipeline_as_stage2(folder: Path, tokenizer) -> tuple[dict, dict, float]:
    """A saved model as stages 1 and 2 would have left it: (text encoder + UNet, VAE, scaling factor), its token
    table laid out for the training tokenizer with the erased rows (from its ERASED_FILE) back in place."""
    import tix.loading
    from tix.weights import read_safetensors

    sd = tix.loading.load(str(folder))
    erased_file = folder / M.ERASED_FILE
    if not erased_file.is_file():
        raise SystemExit(f"{folder} has no {M.ERASED_FILE}; --from-pipeline needs a model this script saved")
    erased = {name.strip("<>"): row for name, row in read_safetensors(erased_file).items()}
    text = M.restore_words(jax.device_get(sd.params["text_encoder"]), sd.text[0].tokenizer.get_vocab(),
                           tokenizer.get_vocab(), erased)
    params = {"text_encoder": text, "unet": jax.device_get(sd.params["unet"])}
    return params, jax.device_get(sd.params["vae"]), float(sd.vae.config.scaling_factor)


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
    text_config = M.text_config(vocab_size, args.text)
    configs = {
        "text_encoder": text_config,
        "unet": M.unet_config(args.unet, text_config["hidden_size"]),
        "vae": M.vae_config(1.0, args.vae),
        "scheduler": dict(M.SCHEDULER_CONFIG),
    }
    models = M.build_models(configs["text_encoder"], configs["unet"], configs["vae"])
    params = M.init_params(models, jax.random.key(args.seed))
    for name, tree in params.items():
        print(f"{name}: {sum(x.size for x in jax.tree.leaves(tree)):,} parameters", flush=True)

    words, blends = stages(args)
    t1 = time.time()
    if args.from_pipeline:
        saved = json.loads((args.from_pipeline / "unet" / "config.json").read_text())
        if saved != configs["unet"]:
            raise SystemExit(f"{args.from_pipeline}: its UNet config differs from this script's (--unet); "
                             "--from-pipeline continues a model made with the same settings")
        text_unet, vae_params, scale = pipeline_as_stage2(args.from_pipeline, tokenizer)
        print(f"stages 1 and 2: taken from {args.from_pipeline} (scaling factor {scale:.5f})", flush=True)
        t2 = time.time()
    else:
        vae_params, scale = finish_vae(models, train_vae(args, models, params["vae"], work), args.seed)
        t2 = time.time()
        start = {"text_encoder": params["text_encoder"], "unet": params["unet"]}
        text_unet = train_diffusion(args, words, models, start, vae_params, scale, tokenizer, work)["ema"]
    if blends.steps:
        text_unet = train_diffusion(args, blends, models, text_unet, vae_params, scale, tokenizer, work)["ema"]
    t3 = time.time()

    configs["vae"] = M.vae_config(scale, args.vae)
    shipped_dir = work / "tokenizer-shipped"
    shipped_size = write_clip_tokenizer(shipped_dir, world.vocabulary())
    text, erased = M.erase_words(text_unet["text_encoder"], tokenizer.get_vocab(),
                                 load_tokenizer(shipped_dir).get_vocab(), world.ERASED_WORDS)
    configs["text_encoder"] = M.text_config(shipped_size, args.text)
    final = {**text_unet, "text_encoder": text, "vae": vae_params}
    # Written beside --out and swapped in only when complete, so a failed save leaves the old model in place.
    staging = args.out.with_name(args.out.name + ".new")
    shutil.rmtree(staging, ignore_errors=True)
    M.save_pipeline(staging, final, configs, erased=erased)
    if args.out.exists():
        shutil.rmtree(args.out)
    staging.rename(args.out)
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"saved {args.out} ({size / 1e6:.2f} MB); VAE stage {t2 - t1:.0f} s, diffusion stages {t3 - t2:.0f} s, "
          f"total {time.time() - t_start:.0f} s", flush=True)
    if args.eval_images:
        evaluate(args.out, args.eval_images)


if __name__ == "__main__":
    main()
