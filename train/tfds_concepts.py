"""Concepts from a TensorFlow Datasets dataset: one concept folder per label value, so `--concepts DIR` learns one
pseudo-word per class of a labelled dataset.

TensorFlow is imported only inside these functions: the rest of tix never needs it (the optional `tfds` extra).
Nothing is downloaded here; the dataset must already be prepared in its data_dir (`tfds build NAME --data_dir DIR`).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tix.errors import ConfigError, TixError

log = logging.getLogger("tix")
MAX_VALUES = 100_000  # distinct values of a non-class label: beyond this it is an id, not a class
MARKER = "tfds.json"  # provenance of a materialized folder; its presence is what allows rewriting the folder
# "name[/config][:x.y.z]" then an optional ":split" (which may hold slices such as "train[:10%]").
_SPEC = re.compile(r"^(?P<name>[^:\[\]]+?)(?::(?P<version>\d+\.(?:\d+|\*)\.(?:\d+|\*)))?(?::(?P<split>.+))?$")


@dataclass(frozen=True)
class TfdsSpec:
    dataset: str  # what tfds.builder takes: "name[/config][:version]"
    split: str


def parse_spec(name_split: str) -> TfdsSpec:
    """`NAME[/CONFIG][:VERSION][:SPLIT]`; the split defaults to "train". A ":x.y.z" part is read as TFDS's version,
    anything else after the first ":" as the split."""
    match = _SPEC.match(name_split.strip())
    if not match or not match["name"].strip():
        raise ConfigError(
            f"--tfds {name_split!r}: expected NAME[:SPLIT], e.g. 'cifar10:train' or 'oxford_iiit_pet:test'"
        )
    dataset = match["name"].strip() + (f":{match['version']}" if match["version"] else "")
    return TfdsSpec(dataset, (match["split"] or "train").strip())


def folder_names(class_names: list[str]) -> list[str]:
    """Distinct, filesystem- and prompt-safe folder names (which become the tokens `<name>`): lower case, runs of
    anything but letters, digits, '_' and '.' turned into '-'; clashes get the label index appended."""
    out, seen = [], set()
    for index, raw in enumerate(class_names):
        name = re.sub(r"[^a-z0-9_.]+", "-", str(raw).lower()).strip("-.")
        if not name:
            name = f"label-{index}"
        if name in seen:
            name = f"{name}-{index}"
        seen.add(name)
        out.append(name)
    return out


def _import_tfds() -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise TixError(
            f"--tfds needs TensorFlow Datasets ({err.name} is not installed): pip install 'tix[tfds]'"
        ) from None
    # A GPU build of TensorFlow would otherwise reserve GPU memory that JAX needs; TFDS only reads files here.
    with contextlib.suppress(RuntimeError):  # TF already initialised its devices in this process: too late to hide
        tf.config.set_visible_devices([], "GPU")
    return tfds


def _builder(tfds: Any, spec: TfdsSpec, data_dir: str | os.PathLike | None) -> Any:
    where = f" in {data_dir}" if data_dir is not None else " in the default data dir (~/tensorflow_datasets)"
    how = (f"prepare it first, where it can be downloaded: `tfds build {spec.dataset.split(':')[0]}"
           f"{f' --data_dir {data_dir}' if data_dir is not None else ''}` (or builder.download_and_prepare()), "
           f"then pass that folder as --data-dir")
    try:
        builder = tfds.builder(spec.dataset, data_dir=None if data_dir is None else os.fspath(data_dir))
    except tfds.core.DatasetNotFoundError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise TixError(f"TFDS dataset {spec.dataset!r} not found{where} ({first}); {how}") from None
    if not builder.is_prepared():
        raise TixError(f"TFDS dataset {spec.dataset!r} is not prepared{where}; tix never downloads it: {how}")
    return builder


def _label_feature(tfds: Any, features: Any, label: str) -> Any:
    if label not in features:
        listing = ", ".join(f"{k} ({type(v).__name__})" for k, v in sorted(features.items()))
        raise ConfigError(f"--label {label!r}: the dataset has no such feature; its features are: {listing}")
    feature = features[label]
    if isinstance(feature, tfds.features.ClassLabel):
        return feature
    if isinstance(feature, (tfds.features.Text, tfds.features.Tensor)) and not feature.shape:
        return feature  # a scalar int or string: each distinct value is a concept named after the value
    labels = sorted(k for k, v in features.items() if isinstance(v, tfds.features.ClassLabel))
    raise ConfigError(
        f"--label {label!r} is a {type(feature).__name__}, not a class label or scalar; "
        f"class-label features: {', '.join(labels) or 'none'}"
    )


def _image_key(tfds: Any, features: Any, image_key: str | None) -> str:
    images = sorted(k for k, v in features.items() if isinstance(v, tfds.features.Image))
    if image_key is not None:
        if image_key not in images:
            raise ConfigError(f"image feature {image_key!r} not found; image features: {', '.join(images) or 'none'} "
                              f"(all features: {', '.join(sorted(features.keys()))})")
        return image_key
    if not images:
        raise ConfigError(f"the dataset has no image feature (features: {', '.join(sorted(features.keys()))}); "
                          f"tix learns concepts from images")
    if len(images) > 1 and "image" not in images:
        raise ConfigError(f"the dataset has several image features ({', '.join(images)}); choose one with image_key")
    return "image" if "image" in images else images[0]


_PNG_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"}


def _save_png(encoded: bytes, path: Path) -> None:
    from PIL import Image

    with Image.open(io.BytesIO(encoded)) as im:
        if im.mode == "I;16B":  # 16-bit PNG grayscale reads big-endian; PNG writes the native 16-bit mode
            im = im.convert("I;16")
        elif im.mode not in _PNG_MODES:  # e.g. CMYK or YCbCr JPEGs, which PNG cannot hold
            im = im.convert("RGBA" if "A" in im.getbands() else "RGB")
        im.save(path, format="PNG")


def materialize(
    name_split: str,
    out_dir: str | os.PathLike,
    *,
    label: str = "label",
    images_per_concept: int = 5,
    data_dir: str | os.PathLike | None = None,
    image_key: str | None = None,
) -> Path:
    """Write up to `images_per_concept` images (PNG) of each label value of a prepared TFDS split into
    `out_dir/<class name>/`, taking the first ones in the split's order (deterministic).

    `name_split` is "NAME[:SPLIT]" (split default "train"). Folder names come from the label's class names made
    safe (see `folder_names`); label values with no image in the split get no folder. `out_dir` must be new, empty,
    or a folder this function wrote before (it is then rewritten). Returns `out_dir`."""
    if images_per_concept < 1:
        raise ConfigError(f"images_per_concept={images_per_concept} must be at least 1")
    spec = parse_spec(name_split)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file; give a folder for the concept folders")
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise ConfigError(f"{out} is not empty and was not written by --tfds; give a new folder")

    tfds = _import_tfds()
    builder = _builder(tfds, spec, data_dir)
    features = builder.info.features
    label_feature = _label_feature(tfds, features, label)
    key = _image_key(tfds, features, image_key)
    # Undecoded images: only the ones kept are decoded (by PIL), so a full class costs no decoding.
    skip = {k: tfds.decode.SkipDecoding() for k, v in features.items() if isinstance(v, tfds.features.Image)}
    try:
        dataset = builder.as_dataset(split=spec.split, shuffle_files=False, decoders=skip)
    except (ValueError, KeyError) as err:
        splits = ", ".join(sorted(builder.info.splits.keys()))
        raise ConfigError(
            f"split {spec.split!r} of {spec.dataset!r} cannot be read ({err}); splits: {splits}"
        ) from None
    dataset = dataset.map(lambda ex: {key: ex[key], label: ex[label]})

    is_class = isinstance(label_feature, tfds.features.ClassLabel)
    class_names = list(label_feature.names) if is_class else None
    picked: dict[Any, list[bytes]] = {}
    unlabelled = 0
    for example in tfds.as_numpy(dataset):
        value = example[label]
        value = int(value) if is_class else (value.decode() if isinstance(value, bytes) else value.item())
        if is_class and not 0 <= value < len(class_names):
            unlabelled += 1  # TFDS marks unlabelled examples (e.g. test splits) with -1
            continue
        if value not in picked and len(picked) >= MAX_VALUES:
            raise ConfigError(f"--label {label!r} has more than {MAX_VALUES} distinct values; "
                              f"it does not look like a class label")
        kept = picked.setdefault(value, [])
        if len(kept) < images_per_concept:
            kept.append(bytes(example[key]))
        if is_class and len(picked) == len(class_names) and all(len(v) >= images_per_concept
                                                                 for v in picked.values()):
            break  # every class is full: the rest of the split need not be read

    if unlabelled:
        log.warning("skipped %d example(s) of %s without a %s value", unlabelled, spec.split, label)
    if not picked:
        raise TixError(f"split {spec.split!r} of {spec.dataset!r} holds no labelled examples")
    values = sorted(picked) if not is_class else list(range(len(class_names)))
    display = class_names if is_class else [str(v) for v in values]
    names = dict(zip(values, folder_names(display), strict=True))
    shown = dict(zip(values, display, strict=True))
    missing = [shown[v] for v in values if v not in picked]
    if missing:
        log.warning("%d label value(s) have no image in %s and get no concept: %s", len(missing), spec.split,
                    ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else ""))

    _clear_previous(out)
    out.mkdir(parents=True, exist_ok=True)
    concepts = {}
    for value, folder_name in names.items():
        if value not in picked:
            continue
        folder = out / folder_name
        folder.mkdir()
        for i, encoded in enumerate(picked[value]):
            _save_png(encoded, folder / f"{i:05d}.png")
        concepts[folder_name] = {"label": shown[value], "images": len(picked[value])}
    record = {"dataset": spec.dataset, "split": spec.split, "label": label, "image": key,
              "images_per_concept": images_per_concept, "data_dir": None if data_dir is None else os.fspath(data_dir),
              "concepts": concepts}
    (out / MARKER).write_text(json.dumps(record, indent=2) + "\n")
    log.info("wrote %d concept folders from %s:%s to %s", len(concepts), spec.dataset, spec.split, out)
    return out


def _clear_previous(out: Path) -> None:
    """Remove the concept folders an earlier materialize wrote (only those its record lists)."""
    marker = out / MARKER
    if not marker.exists():
        return
    try:
        previous = json.loads(marker.read_text()).get("concepts", {})
    except (json.JSONDecodeError, AttributeError):
        raise ConfigError(f"{marker} is unreadable; delete {out} and run again") from None
    for name in previous:
        target = out / name
        if target.is_dir() and target.resolve().parent == out.resolve():
            shutil.rmtree(target)
    marker.unlink()
