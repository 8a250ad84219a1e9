"""Training images and prompts: reading concept folders, decoding images robustly, and the per-concept prompt tables.

Everything here runs once, before training. The train step then draws images, flips, prompts, timesteps and noise on
the device from each concept's own random stream, so no host work or host-device copy happens per step.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

from tix import fs, templates
from tix.errors import ConfigError, TixError
from train.config import ConceptSpec, TrainConfig, coerce, read_yaml

if TYPE_CHECKING:
    from tix.pipeline import StableDiffusion

log = logging.getLogger("tix")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
CONCEPT_FILE = "concept.yaml"
CONCEPT_FIELDS = {f.name for f in dataclasses.fields(ConceptSpec)} - {"images"}


@dataclasses.dataclass(frozen=True)
class Concept:
    """A concept with every default resolved."""

    token: str
    images: tuple[fs.Path, ...]
    init: str
    vectors: int
    style: bool
    prompts: tuple[str, ...]  # templates with "{}" for the token
    per_image_captions: bool  # prompts[i] belongs to images[i]


def concept_specs(cfg: TrainConfig) -> list[ConceptSpec]:
    """The concepts a run learns: the single --images/--token one, or one per subfolder of --concepts."""
    if cfg.images is not None:
        return [ConceptSpec(token=cfg.token, images=cfg.images)]
    root = fs.path(cfg.concepts)
    if not fs.is_dir(root):
        raise ConfigError(f"--concepts {root}: not a folder; it should hold one subfolder of images per concept")
    specs = []
    folders = [p for p in fs.listdir(root) if not p.name.startswith(".") and p.is_dir()]
    _refuse_case_twins(root, folders)
    for folder in folders:
        spec = ConceptSpec(token=f"<{folder.name}>", images=str(folder))
        meta = folder / CONCEPT_FILE
        if meta.exists():
            values = read_yaml(meta, fs.read_text(meta)) or {}
            if not isinstance(values, dict):
                raise ConfigError(f"{meta} must hold a mapping of concept fields, e.g. 'init: cat'")
            unknown = set(values) - CONCEPT_FIELDS
            if unknown:
                raise ConfigError(f"{meta}: unknown fields {sorted(unknown)}; allowed: {sorted(CONCEPT_FIELDS)}")
            values = {k: coerce(ConceptSpec, k, v, f"{meta}: ") for k, v in values.items()}
            spec = dataclasses.replace(spec, **values)
        specs.append(spec)
    if not specs:
        raise ConfigError(f"--concepts {root}: no concept subfolders found")
    return specs


def _refuse_case_twins(root: fs.Path, folders: list[fs.Path]) -> None:
    """CLIP lower-cases prompts, so `<Heart>` and `<heart>` would be one token: two folders must not differ only in
    case."""
    seen: dict[str, fs.Path] = {}
    for folder in folders:
        twin = seen.setdefault(folder.name.lower(), folder)
        if twin is not folder:
            raise ConfigError(
                f"--concepts {root}: subfolders {twin.name!r} and {folder.name!r} differ only in case, but tokens "
                f"ignore case (the tokenizer lower-cases prompts), so both would be one token; rename or merge one"
            )


def resolve_concept(spec: ConceptSpec, cfg: TrainConfig) -> Concept:
    folder = fs.path(spec.images)
    if not fs.is_dir(folder):
        raise ConfigError(f"{spec.token}: image folder {folder} does not exist")
    listing = fs.listdir(folder)  # one listing request on an object store, not one per file
    names = {p.name for p in listing}
    files = _readable(tuple(p for p in listing if p.suffix.lower() in IMAGE_SUFFIXES), folder)
    style = cfg.style if spec.style is None else spec.style
    init = spec.init or cfg.init or ("painting" if style else "sculpture")
    vectors = spec.vectors or cfg.vectors
    captions = [p.with_suffix(".txt") for p in files]
    if spec.captions or cfg.prompts:
        prompts, per_image = tuple(spec.captions or cfg.prompts), False
    elif files and all(c.name in names for c in captions):
        prompts = tuple(_caption_template(c, spec.token) for c in captions)
        per_image = True
    else:
        prompts, per_image = (templates.STYLE if style else templates.OBJECT), False
    for p in prompts:
        if "{}" not in p:
            raise ConfigError(f"{spec.token}: prompt {p!r} does not contain the token (write it as {{}} or the token)")
    return Concept(spec.token, files, init, vectors, style, prompts, per_image)


def image_tokens(token: str, n_images: int) -> list[str]:
    """The per-image tokens of a concept (the paper's per-image baseline): one placeholder per image file."""
    return [f"{token}_image{i}" for i in range(n_images)]


def training_prompts(prompts: tuple[str, ...], token: str, image_tokens: list[str] | None = None,
                     per_image: bool = False) -> list[str]:
    """The rows of a concept's prompt table: each template with the token, then, with per-image tokens, the same
    prompts naming the image's own token too, "<prompt> with <token>_image<i>" (the paper's code's dual templates,
    "a photo of a {} with {}"): one per caption (per-image captions, caption i with token i) or one per
    (template, image) pair, template-major. `train.step.image_token_row` indexes this layout.
    `image_tokens`: one per usable image, in the order of the image table."""
    plain = [t.format(token) for t in prompts]
    if not image_tokens:
        return plain
    if per_image:
        return plain + [f"{p} with {s}" for p, s in zip(plain, image_tokens, strict=True)]
    return plain + [f"{p} with {s}" for p in plain for s in image_tokens]


def check_prompts_fit(sd: StableDiffusion, concept: Concept) -> None:
    """Refuse a concept whose longest prompt, with the token spelled out as its vectors, is longer than the text
    encoder reads: the cut-off end would silently drop vectors (or caption words) from training."""
    prompts = [p.format(concept.token) for p in concept.prompts]
    counts = sd.token_counts(prompts)
    worst = int(np.argmax(counts))
    excess = counts[worst] - sd.max_length
    if excess > 0:
        fewer = f"--vectors {concept.vectors - excess} or fewer, or " if concept.vectors > excess else ""
        raise ConfigError(
            f"{concept.token}: with its {concept.vectors} vector(s) the prompt {concept.prompts[worst]!r} takes "
            f"{counts[worst]} tokens, but the text encoder reads at most {sd.max_length} (start and end included); "
            f"use {fewer}shorter prompts or captions"
        )


def _readable(files: tuple[fs.Path, ...], folder: fs.Path) -> tuple[fs.Path, ...]:
    """The files that can be read. A symlink that loops or points nowhere, a folder named like an image, or a file
    without read permission is skipped here, with a warning, rather than failing after training (the run's
    provenance hash reads every image file)."""
    if fs.is_remote(folder):  # an object store lists only objects
        return files
    kept = []
    for p in files:
        if os.path.isfile(p) and os.access(p, os.R_OK):
            kept.append(p)
        else:
            warnings.warn(f"skipping {p}: not a readable file (a symlink that loops or points nowhere, a folder, "
                          "or no read permission)", stacklevel=3)
    return tuple(kept)


def _caption_template(path: fs.Path, token: str) -> str:
    text = fs.read_text(path).strip()
    if token not in text and "{}" not in text:
        raise ConfigError(
            f"caption {path} must contain the token {token!r} (or {{}}), e.g. 'a photo of {token} on a table'"
        )
    return text.replace(token, "{}")


def load_image(path: fs.PathLike) -> Image.Image | None:
    """An RGB image with EXIF orientation applied, or None (with a warning naming the file) if unreadable."""
    try:
        with Image.open(fs.readable(path)) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(background, rgba).convert("RGB")
            if im.mode.startswith("I"):  # 16-bit (and 32-bit integer) greyscale: convert("RGB") would clip at 255
                return _grey_to_rgb(im)
            return im.convert("RGB")  # 8-bit greyscale, CMYK, palette; 16-bit RGB(A) already opens as 8-bit
    except Exception as err:
        # Not only UnidentifiedImageError/OSError: Pillow's decoders raise whatever their parser hits on damaged bytes
        # (SyntaxError, struct.error, IndexError, ...), and one bad file must not stop a run.
        warnings.warn(f"skipping unreadable image {path}: {type(err).__name__}: {err}", stacklevel=2)
        return None


def _grey_to_rgb(image: Image.Image) -> Image.Image:
    """An integer greyscale image scaled from its bit depth (16-bit: 0..65535) to 8 bits."""
    values = np.asarray(image).astype(np.float64)
    top = 65535.0 if values.max(initial=0) <= 65535 else float(values.max())
    grey = np.round(np.clip(values, 0, None) * (255.0 / top)).astype(np.uint8)
    return Image.fromarray(grey, "L").convert("RGB")


def crops(
    image: Image.Image, resolution: int, *, center: bool, count: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Resize the short side to `resolution` (bicubic) and crop squares: the centre, or `count` random ones.
    Returns float32 HWC arrays in [-1, 1]."""
    w, h = image.size
    scale = resolution / min(w, h)
    size = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    image = image.resize(size, Image.Resampling.BICUBIC)
    w, h = image.size
    if center:
        boxes = [((w - resolution) // 2, (h - resolution) // 2)]
    else:
        boxes = [(int(rng.integers(0, w - resolution + 1)), int(rng.integers(0, h - resolution + 1)))
                 for _ in range(count)]
    out = []
    for x, y in boxes:
        arr = np.asarray(image.crop((x, y, x + resolution, y + resolution)), np.float32)
        out.append(arr / 127.5 - 1.0)
    return out


def load_concept_pixels(
    concept: Concept, cfg: TrainConfig, resolution: int
) -> tuple[np.ndarray, tuple[str, ...], list[fs.Path]]:
    """[n_images, views, H, W, 3] pixels of the usable images (views: each crop, then its mirror image), and the
    prompts aligned with them, and the files used."""
    rng = np.random.default_rng(cfg.seed)
    images, prompts, used = [], [], []
    for i, path in enumerate(concept.images):
        image = load_image(path)
        if image is None:
            continue
        used.append(path)
        views = crops(image, resolution, center=cfg.center_crop, count=cfg.random_crops, rng=rng)
        images.append(np.stack([x for v in views for x in (v, v[:, ::-1])]))
        if concept.per_image_captions:
            prompts.append(concept.prompts[i])
    if not images:
        raise TixError(
            f"{concept.token}: no usable image in {concept.images[0].parent if concept.images else 'its folder'} "
            f"(jpg, png or webp files that open); add 3-5 images of the concept"
        )
    return np.stack(images), tuple(prompts) if concept.per_image_captions else concept.prompts, used
