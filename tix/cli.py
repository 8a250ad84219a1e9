"""The `tix` command: generate, invert, export, concepts, eval, pick."""

from __future__ import annotations

import argparse
import logging
import math
import sys
import tempfile
from pathlib import Path

from tix import host_memory
from tix.errors import TixError
from tix.sampler_names import SAMPLERS

log = logging.getLogger("tix.cli")


def _check_generate_args(args: argparse.Namespace) -> None:
    if args.n < 1:
        raise TixError(f"--n {args.n}: the number of images must be at least 1")
    if args.steps < 1:
        raise TixError(f"--steps {args.steps}: the number of sampling steps must be at least 1")
    if args.size is not None and args.size < 8:
        raise TixError(f"--size {args.size}: give the image size in pixels, e.g. 512 (or leave it out for the model's)")
    if not math.isfinite(args.guidance):
        raise TixError(f"--guidance {args.guidance}: give a finite number, e.g. 7.5")
    out = Path(args.out)
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise TixError(f"--out {out}: {existing} is a file, not a folder; give a folder for the images")


def _writable_folder(out: Path) -> Path:
    """Create `out` and prove a file can be written there, before the minutes of sampling that would be lost."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        raise TixError(f"--out {out}: cannot write there ({err.strerror or err}); choose another folder") from None
    return out


def _generate(args: argparse.Namespace) -> None:
    import tix
    from tix.embedding_files import safe_stem

    _check_generate_args(args)
    sd = tix.load(args.model, args.dtype)
    for path in args.embeddings or []:
        names = sd.load_embeddings(path)
        print(f"loaded {', '.join(names)} from {path}")
    out = _writable_folder(Path(args.out))
    prompts = [args.prompt] * args.n
    edit = {}
    if args.image:
        edit["image"] = _read_image(args.image, args.size, sd.vae_scale_factor)
        edit["strength"] = args.strength
        if args.mask:
            edit["mask"] = _read_mask(args.mask, edit["image"].shape[:2])
    elif args.mask:
        raise TixError("--mask needs the image it edits: add --image PATH")
    images = sd.generate(prompts, negative=args.negative, steps=args.steps, guidance=args.guidance,
                         sampler=args.sampler, seed=args.seed, size=None if args.image else args.size, **edit)
    from PIL import Image

    from train.report import grid

    stem = safe_stem(args.prompt)[:60]
    try:
        for i, image in enumerate(images):
            Image.fromarray(image).save(out / f"{stem}-{args.seed}-{i}.png")
        grid(images, min(len(images), 4)).save(out / f"{stem}-{args.seed}-grid.png")
    except OSError as err:
        raise TixError(f"--out {out}: writing the images failed ({err.strerror or err})") from None
    print(f"wrote {len(images)} images and a grid to {out}")


def _open_image(path: str):
    from PIL import Image, UnidentifiedImageError

    from tix import fs

    try:
        with fs.open_read(path) as f:
            image = Image.open(f)
            image.load()
    except (FileNotFoundError, UnidentifiedImageError, OSError) as err:
        raise TixError(f"{path}: cannot read it as an image ({err})") from None
    return image


def _read_image(path: str, size: int | None, multiple: int):
    """The image as uint8 [H, W, 3]: resized to --size when given, else cut down to a multiple of the VAE factor
    (as diffusers' image processor does)."""
    import numpy as np
    from PIL import Image

    image = _open_image(path).convert("RGB")
    width, height = (size, size) if size else (image.width - image.width % multiple,
                                               image.height - image.height % multiple)
    if min(width, height) < multiple:
        raise TixError(f"{path}: {image.width}x{image.height} is smaller than the model's {multiple}-pixel latent cell")
    if (width, height) != image.size:
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    return np.asarray(image)


def _read_mask(path: str, shape: tuple[int, int]):
    """The mask as uint8 [H, W] (white: edit, black: keep), resized to the image's size."""
    import numpy as np
    from PIL import Image

    mask = _open_image(path).convert("L")
    if mask.size != (shape[1], shape[0]):
        mask = mask.resize((shape[1], shape[0]), Image.Resampling.BILINEAR)
    return np.asarray(mask)


def _invert(args: argparse.Namespace) -> None:
    from train.config import load_config, parse_set
    from train.invert import run, summary

    overrides = {
        "model": args.model, "images": args.images, "token": args.token, "concepts": args.concepts,
        "init": args.init, "out": args.out, "vectors": args.vectors, "style": args.style or None,
        "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "scale_lr": args.scale_lr,
        "resolution": args.resolution, "seed": args.seed, "save_every": args.save_every,
        "validate_every": args.validate_every, "resume": args.resume or None, "overwrite": args.overwrite or None,
        "init_from": args.init_from, "coordinator_address": args.coordinator, "num_processes": args.num_processes,
        "process_id": args.process_id,
    }
    if args.tfds:
        from train.tfds_concepts import materialize

        # Every host materializes the same folders (deterministic), then reads only its share of them.
        cache = Path(args.tfds_cache).expanduser()
        overrides["concepts"] = str(materialize(args.tfds, cache / args.tfds.replace("/", "_").replace(":", "_"),
                                                label=args.label, images_per_concept=args.images_per_concept,
                                                data_dir=args.data_dir))
    overrides.update(parse_set(args.set or []))
    cfg = load_config(args.config, overrides)
    if args.compile_only or args.target:  # a TPU that is not attached can be compiled for, never trained on
        from train.invert import plan

        step_plan = plan(cfg, target=args.target)
        print(step_plan.describe())
        raise SystemExit(3 if step_plan.fits is False else 0)  # 3: does not fit (2 is a usage error)
    try:
        result = run(cfg)
    except KeyboardInterrupt as stop:  # train.stop.Stopped after saving (75 on SIGTERM, 130 on Ctrl-C), or Ctrl-C
        print(f"\n{stop}", file=sys.stderr)
        raise SystemExit(getattr(stop, "exit_code", 130)) from None
    print(summary(result))


def _library_concepts(args: argparse.Namespace) -> list:
    from tix import fs
    from tix.library import Library

    source = fs.path(args.source)  # local or gs://
    if Library(source.parent).is_entry(source):  # one concept folder inside a library
        entries = [Library(source.parent).read(source)]
    else:
        library_root = source / "tokens" if fs.is_dir(source / "tokens") else source
        entries = Library(library_root).entries()
    if not entries:
        raise TixError(f"{source}: no learned concepts found (give a run folder, a concept library, or --token)")
    if args.token:
        known = [e.concept.token for e in entries]
        entries = [e for e in entries if e.concept.token == args.token]
        if not entries:
            raise TixError(f"{source} has no token {args.token!r}; it holds: {', '.join(known)}")
    return [e.concept for e in entries]


def _export(args: argparse.Namespace) -> None:
    from tix import embedding_files, hub

    if hub.is_hub_id(args.source):  # a published concept, e.g. sd-concepts-library/cat-toy: convert its format
        concepts = [c for c in embedding_files.read(args.source) if args.token in (None, c.token)]
        if not concepts:
            raise TixError(f"{args.source} has no concept {args.token!r}")
    else:
        concepts = _library_concepts(args)
    written = embedding_files.write(concepts if len(concepts) > 1 else concepts[0], args.out, format=args.format,
                                    torch_pickle=args.torch_pickle or None, name=args.name)
    for path in written:
        print(path)
    if args.format != "diffusers":
        # One file per concept. stdout stays the list of files (for scripts); the prompt words go to the log (stderr).
        for concept, path in zip(concepts, written, strict=True):
            log.info("%s: type %s in AUTOMATIC1111, embedding:%s in ComfyUI", concept.token, path.stem, path.stem)


def _show(entry) -> None:
    for key, value in entry.meta.items():
        print(f"{key}: {value}")
    for name, vectors in entry.concept.vectors.items():
        print(f"{name}: {vectors.shape[0]} x {vectors.shape[1]}, norm {float((vectors ** 2).sum() ** 0.5):.4f}")
    made = entry.concept.provenance
    print(f"exports record: step {made.steps}, model {made.model}, model hash {made.model_hash} "
          "(A1111 .pt: step, sd_checkpoint_name, sd_checkpoint; .safetensors metadata: steps, model, model_hash)")


def _concepts(args: argparse.Namespace) -> None:
    from tix import embedding_files, fs, hub
    from tix.library import Library

    library = Library(args.library)
    if args.action != "merge" and not fs.is_dir(library.root):
        raise TixError(f"no concept library at {library.root}: the folder does not exist")
    if args.action == "merge" and args.other and not fs.is_dir(fs.absolute(args.other)):
        raise TixError(f"--other {args.other}: no concept library there (the folder does not exist)")
    if args.action in ("show", "rm") and not args.token:
        raise TixError(f"tix concepts {args.action} needs the token: tix concepts {args.action} LIBRARY TOKEN")
    if args.action == "merge" and not args.other:
        raise TixError("tix concepts merge needs the library to copy from: --other LIBRARY")
    if args.action == "list":
        entries = library.entries()
        if not entries:
            print(f"{library.root} holds no concepts", file=sys.stderr)
        for entry in entries:
            m = entry.meta
            print(f"{entry.concept.token}\t{m.get('family')}\t{entry.concept.num_vectors} vec\t{m.get('base_model')}")
    elif args.action == "show":
        _show(library.get(args.token))
    elif args.action == "rm":
        library.remove(args.token)
        print(f"removed {args.token}")
    elif args.action == "merge" and hub.is_hub_id(args.other):
        added = []
        for concept in embedding_files.read(args.other):
            meta = {"source": f"hub:{args.other}", "family": "sdxl" if "text_encoder_2" in concept.vectors else None}
            library.add(concept, meta, replace=args.replace)
            added.append(concept.token)
        print(f"merged {len(added)} concept(s) from {args.other} into {library.root}")
    elif args.action == "merge":
        added = library.merge(Library(args.other), replace=args.replace)
        print(f"merged {len(added)} concept(s) into {library.root}")


def _eval(args: argparse.Namespace) -> None:
    from tix.evaluation import Protocol
    from train.evaluate import run_eval

    protocol = Protocol(samples=args.samples, steps=args.steps, guidance=args.guidance, sampler=args.sampler,
                        batch=args.batch, seed=args.seed, size=args.size)
    folder = run_eval(args.sources, model=args.model, clip=args.clip, out=args.out, protocol=protocol,
                      images=args.images, phrases=args.phrase or [], style=args.style, dtype=args.dtype)
    print(f"wrote {folder / 'eval.json'} and {folder / 'eval.html'}")


def _pick(args: argparse.Namespace) -> None:
    from train.pick import pick_runs

    summary = pick_runs(args.runs, args.out, repeats=args.repeats, seed=args.seed)
    for token, result in summary["concepts"].items():
        losses = ", ".join(f"{run} {loss:.5f}" for run, loss in result["losses"].items())
        print(f"{token}: {result['picked']} (loss {losses})")
    print(f"wrote the picked vectors and pick.json to {args.out}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tix", description="Textual inversion for Stable Diffusion on JAX.")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="text-to-image with a tix-loaded model (and learned embeddings)")
    g.add_argument("--model", default="toyworld", help="diffusers folder, Hub id, or 'toyworld'")
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative", default=None)
    g.add_argument("--n", type=int, default=4)
    g.add_argument("--steps", type=int, default=25)
    g.add_argument("--guidance", type=float, default=7.5)
    g.add_argument("--sampler", default="dpm++2m", choices=SAMPLERS)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--size", type=int, default=None, help="pixels (default: the model's native size)")
    g.add_argument("--dtype", default="float32")
    g.add_argument("--embeddings", nargs="*", help="embedding files or Hub ids (owner/name) to load")
    g.add_argument("--image", help="image-to-image: start from this picture (output takes its size, or --size)")
    g.add_argument("--strength", type=float, default=0.8,
                   help="--image: how much to change it, 0-1 (runs the last int(steps x strength) steps)")
    g.add_argument("--mask", help="--image: edit only where this mask is white (black: keep the image)")
    g.add_argument("--out", default="outputs")
    g.set_defaults(fn=_generate)

    i = sub.add_parser("invert", help="learn pseudo-words from images (textual inversion)")
    i.add_argument("--config", help="YAML file of config fields (see configs/)")
    i.add_argument("--model")
    i.add_argument("--images", help="folder of 3-5 images of one concept")
    i.add_argument("--token", help="the placeholder to learn, e.g. '<my-cat>'")
    i.add_argument("--concepts", help="folder with one subfolder of images per concept")
    i.add_argument("--init", help="initializer word(s), e.g. 'cat'; more words than vectors start each vector at "
                   "the mean of its share ('red sports car' into one vector)")
    i.add_argument("--out")
    i.add_argument("--vectors", type=int)
    i.add_argument("--style", action="store_true", help="learn a style (style templates, init 'painting')")
    i.add_argument("--steps", type=int)
    i.add_argument("--batch-size", type=int, help="images per concept per step")
    i.add_argument("--lr", type=float)
    i.add_argument("--scale-lr", action=argparse.BooleanOptionalAction, default=None,
                   help="multiply lr by batch size x gradient accumulation (default on)")
    i.add_argument("--resolution", type=int)
    i.add_argument("--seed", type=int)
    i.add_argument("--save-every", type=int)
    i.add_argument("--validate-every", type=int)
    i.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    i.add_argument("--overwrite", action="store_true", help="start the run in --out again from scratch")
    i.add_argument("--set", action="append", metavar="KEY=VALUE", help="set any config field, e.g. lr_schedule=cosine")
    i.add_argument("--init-from", help="start from the vectors of an embedding file (any format tix reads)")
    i.add_argument("--tfds", metavar="NAME[:SPLIT]", help="one concept per label of a prepared TensorFlow Dataset")
    i.add_argument("--label", default="label", help="--tfds: the label feature")
    i.add_argument("--images-per-concept", type=int, default=5, help="--tfds: images per label")
    i.add_argument("--data-dir", help="--tfds: the TFDS data folder holding the prepared dataset")
    i.add_argument("--tfds-cache", default="~/.cache/tix/tfds", help="--tfds: where the label folders are written")
    i.add_argument("--coordinator", help="many hosts without auto-detection: coordinator host:port")
    i.add_argument("--num-processes", type=int, help="many hosts: number of processes")
    i.add_argument("--process-id", type=int, help="many hosts: this process's index")
    i.add_argument("--compile-only", action="store_true",
                   help="compile the train step from shapes, print its FLOPs per image, memory per device and whether "
                        "it fits, and exit (0: fits or no limit known, 3: does not fit); no image is decoded, --out "
                        "is not touched")
    i.add_argument("--target", metavar="TPU_TYPE",
                   help="compile for a TPU slice that is not here (v4-N, v5p-N, v5litepod-N or v5e-N, v6e-N, e.g. "
                        "v5litepod-8); implies --compile-only; needs libtpu (pip install 'jax[tpu]'), not a TPU")
    i.set_defaults(fn=_invert)

    e = sub.add_parser("export", help="write learned tokens in a format other tools load")
    e.add_argument("source", help="run folder, concept library, one concept (with --token), or a Hub id owner/name")
    e.add_argument("--format", default="diffusers", choices=["diffusers", "a1111", "kohya"])
    e.add_argument("--token", help="only this concept")
    e.add_argument("--torch-pickle", action="store_true",
                   help="write torch pickles (.bin/.pt; A1111's own .pt for --format a1111) instead of safetensors")
    e.add_argument("--out", required=True, help="a folder (files named after each token), or a .safetensors/.pt/.bin "
                   "file for one concept")
    e.add_argument("--name", help="one concept: the file name to use instead of the token's (the word A1111 and "
                   "ComfyUI prompts type)")
    e.set_defaults(fn=_export)

    c = sub.add_parser("concepts", help="manage a concept library")
    c.add_argument("action", choices=["list", "show", "rm", "merge"])
    c.add_argument("library")
    c.add_argument("token", nargs="?", help="for show/rm")
    c.add_argument("--other", help="for merge: the library to copy from, or a Hub concept id owner/name")
    c.add_argument("--replace", action="store_true")
    c.set_defaults(fn=_concepts)

    v = sub.add_parser("eval", help="score learned words: the paper's CLIP image and text similarity")
    v.add_argument("sources", nargs="+", metavar="RUN_OR_EMBEDDING", help="run folders or embedding files")
    v.add_argument("--model", default="toyworld", help="diffusers folder, Hub id, or 'toyworld'")
    v.add_argument("--clip", help="transformers CLIPModel folder or Hub id (the paper: openai/clip-vit-base-patch32)")
    v.add_argument("--out", help="where eval.json and eval.html go (default: the run folder)")
    v.add_argument("--images", help="an embedding file's training images (a run folder knows its own)")
    v.add_argument("--phrase", action="append", metavar="TOKEN=PHRASE",
                   help="also score PHRASE in place of TOKEN (e.g. a caption to compare with), against its images")
    v.add_argument("--style", action="store_true", help="embedding files hold styles (style prompts)")
    v.add_argument("--samples", type=int, default=64, help="samples per prompt (the paper: 64); fewer is faster")
    v.add_argument("--steps", type=int, default=50)
    v.add_argument("--guidance", type=float, default=5.0)
    v.add_argument("--sampler", default="ddim", choices=SAMPLERS)
    v.add_argument("--batch", type=int, default=8, help="images per generation batch")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--size", type=int, default=None, help="pixels (default: the model's native size)")
    v.add_argument("--dtype", default="float32")
    v.set_defaults(fn=_eval)

    k = sub.add_parser("pick", help="keep each concept's vectors from the run whose vectors fit its images best")
    k.add_argument("runs", nargs="+", metavar="RUN", help="--out folders of runs of the same concepts and images")
    k.add_argument("--out", required=True, help="a new folder for the picked vectors and pick.json")
    k.add_argument("--repeats", type=int, default=8,
                   help="fixed draws per training view and tenth of the schedule (default 8); more for close runs")
    k.add_argument("--seed", type=int, default=0, help="the fixed draws' seed: a pick that moves with it is a tie")
    k.set_defaults(fn=_pick)
    return p


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("tix").setLevel(logging.INFO)  # tix's own progress; orbax/absl chatter stays at WARNING
    args = parser().parse_args(argv)
    host_memory.keep_freed_memory()  # this process trains or samples until done: reuse freed memory, see the module
    try:
        args.fn(args)
    except TixError as err:
        print(f"tix: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
