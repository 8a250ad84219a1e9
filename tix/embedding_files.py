"""Textual-inversion embedding files: read every format the PyTorch tools write, write the ones they load.

This module is pure I/O: numpy in, numpy out, no model code. A learned concept is a `Concept`: a token and, per text
encoder, its vectors as float32 ``[n, D]``. Encoder keys are the diffusers component names:

- ``"text_encoder"``: the only encoder of SD 1.x (CLIP-L, D=768) and SD 2.x (OpenCLIP-H, D=1024); on SDXL the first
  encoder (CLIP-L, 768), which SDXL files call ``clip_l``.
- ``"text_encoder_2"``: SDXL's second encoder (OpenCLIP-bigG, 1280), which SDXL files call ``clip_g``.

Formats written by `write` (see the table in the shared formats reference). Front-ends take the prompt word from the
file name, so exports are named after the token (``<my-heart>`` -> ``my-heart.safetensors``):

- ``"diffusers"``: ``{token: [n, D]}`` in ``<name>/learned_embeds.safetensors`` or, with ``torch_pickle=True``,
  ``learned_embeds.bin``; SDXL is the two-file form of diffusers' SDXL script (``learned_embeds.safetensors`` for
  text_encoder and ``learned_embeds_2.safetensors`` for text_encoder_2), which only diffusers loads.
- ``"a1111"``: ``<name>.safetensors`` holding ``{"emb_params": [n, D]}`` (AUTOMATIC1111 and ComfyUI read it as a
  one-term file); with ``torch_pickle`` AUTOMATIC1111's own ``.pt`` (``string_to_param``, ``name``, ``step``,
  ``sd_checkpoint``, ``sd_checkpoint_name``). SDXL: ``{"clip_l", "clip_g"}``.
- ``"kohya"``: ``{"emb_params": [n, D]}`` (``.safetensors`` default, ``.pt`` with torch_pickle); SDXL
  ``{"clip_l": [n, 768], "clip_g": [n, 1280]}``, the file A1111 and ComfyUI load for SDXL.

Every ``.safetensors`` file also carries the concept's `Provenance` in its metadata (token, steps, model, model hash,
vectors, tix version); A1111's ``.pt`` has fields for steps and model. Other pickles (kohya, diffusers ``.bin``,
SDXL) must hold their tensors alone, or the front-ends refuse them. Pickles are written in torch's legacy (non-zip)
serialization: AUTOMATIC1111's safe-unpickler gate accepts only the zip members ``data.pkl``, ``version`` and
``data/N``, and current torch.save adds others (``.format_version``, ``byteorder``, ...), so the zip form would be
refused with A1111's default settings.

`read` detects the format from the file's bytes, not its name, and also reads the paper's ``embeddings.pt`` (a pickled
``ParameterDict``), the diffusers Flax example's ``learned_embeds.npy`` (a pickled object array), A1111 PNGs with an
``sd-ti-embedding`` text chunk, raw tensors (with ``token=``) and folders.

Pickles run code when loaded, so they are never unpickled freely: torch files go through
``torch.load(weights_only=True)`` (the paper's ParameterDict is mapped to an inert stand-in class, so no torch module
code runs on file data) and ``.npy`` object arrays through a restricted unpickler that can only rebuild numeric arrays.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import pickle
import re
import struct
import tokenize
import warnings
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import IO, Any

import numpy as np

import tix
from tix import fs
from tix.errors import ConfigError, TixError
from tix.fs import Path

ENCODERS = ("text_encoder", "text_encoder_2")
# The names SDXL single-file embeddings (kohya, A1111, ComfyUI, diffusers' advanced scripts) give the two encoders.
SDXL_FILE_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
FORMATS = ("diffusers", "a1111", "kohya")
FAMILIES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}

_WIDTH_HINTS = {768: "as SD 1.x / SDXL clip_l", 1024: "as SD 2.x", 1280: "as SDXL clip_g"}
_A1111_TOKEN_ID = 265  # the id A1111 and the paper store under string_to_token; nothing reads it back
_EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin", ".npy", ".png")
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}
_MAX_STEM = 100


class EmbeddingFileError(TixError, ValueError):
    """An embedding file tix cannot read or write, or an embedding that does not fit a model."""


@dataclass(frozen=True)
class Provenance:
    """How a concept was made, as exported files record it; None where unknown.

    `steps`: optimizer steps trained (A1111's ``step``, which it shows and resumes its own training from). `model`:
    the base model as its users name it (a Hub id, or a local folder's own name; A1111's ``sd_checkpoint_name``).
    `model_hash`: `tix.library.table_hash` of the model's first text encoder token table (A1111's ``sd_checkpoint``
    field; A1111 itself puts a checkpoint file's sha256 there, which a diffusers folder does not have).
    """

    steps: int | None = None
    model: str | None = None
    model_hash: str | None = None

    def __post_init__(self) -> None:
        if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, int)
                                       or self.steps < 0):
            raise EmbeddingFileError(f"provenance steps must be a non-negative int, got {self.steps!r}")


@dataclass(frozen=True, eq=False)
class Concept:
    """A learned token and its vectors per text encoder (keys in `ENCODERS`, values float32 ``[n, D]``), and what is
    known of how it was made.

    ``[D]`` is accepted as one vector. SD 1/2 concepts have only ``text_encoder``; SDXL concepts have both encoders
    with the same n.
    """

    token: str
    vectors: Mapping[str, np.ndarray]
    provenance: Provenance = Provenance()

    def __post_init__(self) -> None:
        if not isinstance(self.token, str) or not self.token:
            raise EmbeddingFileError(f"a concept's token must be a non-empty string, got {self.token!r}")
        unknown = sorted(set(self.vectors) - set(ENCODERS))
        if unknown:
            hint = ""
            if set(unknown) & {"clip_l", "clip_g"}:
                hint = " (SDXL files' clip_l is text_encoder and clip_g is text_encoder_2)"
            raise EmbeddingFileError(
                f"concept {self.token!r}: unknown text encoder key(s) {unknown}; use {list(ENCODERS)}{hint}"
            )
        if "text_encoder" not in self.vectors:
            raise EmbeddingFileError(f"concept {self.token!r} has no 'text_encoder' vectors")
        normalized = {}
        for name in ENCODERS:
            if name in self.vectors:
                normalized[name] = _as_vectors(self.vectors[name], f"concept {self.token!r} {name}")
        counts = {name: v.shape[0] for name, v in normalized.items()}
        if len(set(counts.values())) > 1:
            raise EmbeddingFileError(
                f"concept {self.token!r}: the encoders have different numbers of vectors {counts}; SDXL embeddings "
                "need one vector per token position in both encoders"
            )
        object.__setattr__(self, "vectors", normalized)

    @property
    def num_vectors(self) -> int:
        return self.vectors["text_encoder"].shape[0]

    @property
    def is_sdxl(self) -> bool:
        return "text_encoder_2" in self.vectors

    @property
    def widths(self) -> dict[str, int]:
        return {name: v.shape[1] for name, v in self.vectors.items()}

    def __repr__(self) -> str:
        shapes = {name: tuple(v.shape) for name, v in self.vectors.items()}
        return f"Concept(token={self.token!r}, vectors={shapes}, provenance={self.provenance})"


def _as_vectors(value: Any, what: str) -> np.ndarray:
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as e:  # ragged lists, objects numpy cannot hold
        raise EmbeddingFileError(f"{what}: expected float vectors, got {type(value).__name__} ({e})") from e
    if array.dtype.kind not in "fiu" and str(array.dtype) != "bfloat16":
        raise EmbeddingFileError(f"{what}: expected float vectors, got dtype {array.dtype}")
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2 or array.shape[0] < 1 or array.shape[1] < 1:
        raise EmbeddingFileError(f"{what}: expected shape [D] or [n, D], got {list(np.shape(value))}")
    return np.array(array, dtype=np.float32, copy=True, order="C")


# ---------------------------------------------------------------------------------------------------------------------
# Validation against a model


def _describe_width(width: int) -> str:
    hint = _WIDTH_HINTS.get(width)
    return f"{width} ({hint})" if hint else str(width)


def check_compatible(concept: Concept, widths: Mapping[str, int], family: str) -> None:
    """Raise `EmbeddingFileError` unless `concept` fits a model of `family` ("sd1", "sd2" or "sdxl") whose text encoders
    have token-embedding `widths` (e.g. ``{"text_encoder": 768}`` or ``{"text_encoder": 768, "text_encoder_2": 1280}``).
    """
    if family not in FAMILIES:
        raise ConfigError(f"family {family!r} is not one of {sorted(FAMILIES)}")
    needed = ENCODERS if family == "sdxl" else ENCODERS[:1]
    missing = [name for name in needed if name not in widths]
    if missing:
        raise ConfigError(f"widths for a {FAMILIES[family]} model must give {list(needed)}; missing {missing}")
    model = FAMILIES[family]
    if concept.is_sdxl and family != "sdxl":
        raise EmbeddingFileError(
            f"embedding {concept.token!r} is an SDXL embedding (clip_l width "
            f"{concept.widths['text_encoder']}, clip_g width {concept.widths['text_encoder_2']}) but the model is "
            f"{model} with one text encoder of width {_describe_width(widths['text_encoder'])}; use an embedding "
            f"trained for {model}"
        )
    if family == "sdxl" and not concept.is_sdxl:
        raise EmbeddingFileError(
            f"embedding {concept.token!r} has vectors for one text encoder only (width "
            f"{_describe_width(concept.widths['text_encoder'])}) but the model is SDXL, which needs vectors for "
            f"clip_l (width {widths['text_encoder']}) and clip_g (width {widths['text_encoder_2']}); use an SDXL "
            "embedding (a {clip_l, clip_g} file or diffusers' learned_embeds + learned_embeds_2 pair)"
        )
    for name in needed:
        have, want = concept.widths[name], int(widths[name])
        if have != want:
            label = SDXL_FILE_KEYS[name] if family == "sdxl" else name
            raise EmbeddingFileError(
                f"embedding {concept.token!r} has {label} width {_describe_width(have)} but the {model} model's "
                f"{name} has width {_describe_width(want)}; the embedding was trained for another model family"
            )


# ---------------------------------------------------------------------------------------------------------------------
# Safe file names


def safe_stem(token: str) -> str:
    """A file-name stem for `token` made only of ``[A-Za-z0-9._-]``: no separators, no ``..``, no leading dot or dash,
    no Windows device name, at most 100 characters; ``"embedding"`` when nothing usable is left."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", token)
    stem = re.sub(r"\.{2,}", ".", stem).strip("._-")
    stem = stem[:_MAX_STEM].rstrip("._-")
    if not stem:
        stem = "embedding"
    if stem.split(".")[0].upper() in _WINDOWS_RESERVED:
        stem = f"{stem}_"
    return stem


def output_stems(tokens: Iterable[str]) -> list[str]:
    """`safe_stem` of each token, made unique case-insensitively (for macOS/Windows file systems) by appending
    ``-2``, ``-3``, ... in input order, so the same tokens always get the same names."""
    taken: set[str] = set()
    stems = []
    for token in tokens:
        base = safe_stem(token)
        stem, i = base, 1
        while stem.lower() in taken:
            i += 1
            stem = f"{base}-{i}"
        taken.add(stem.lower())
        stems.append(stem)
    return stems


# ---------------------------------------------------------------------------------------------------------------------
# Writing


def _torch(purpose: str):
    try:
        import torch
    except ImportError as e:
        raise EmbeddingFileError(
            f"{purpose} needs PyTorch, which is not installed: install torch (pip install torch), or use "
            ".safetensors files, which tix reads and writes without it"
        ) from e
    return torch


def _dump_safetensors(f: IO[bytes], tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> None:
    from safetensors.numpy import save

    f.write(save(dict(tensors), metadata=dict(metadata)))


def _dump_torch(f: IO[bytes], obj: Any) -> None:
    torch = _torch("writing a PyTorch pickle (.pt/.bin)")

    def convert(value: Any) -> Any:
        if isinstance(value, np.ndarray):
            return torch.from_numpy(np.ascontiguousarray(value))
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        return value

    # The legacy (non-zip) layout: AUTOMATIC1111's safe unpickler refuses the extra zip members of current torch.save
    # (see the module docstring); torch.load, weights_only included, and ComfyUI read both layouts.
    torch.save(convert(obj), f, _use_new_zipfile_serialization=False)


def _atomic_write(jobs: list[tuple[Path, Callable[[IO[bytes]], None]]]) -> None:
    """Build every file in memory (embeddings are small), then hand them to tix.fs, which writes them atomically
    (locally: temporaries renamed into place once all are complete; gs://: whole objects)."""
    contents = []
    for path, fill in jobs:
        buffer = io.BytesIO()
        fill(buffer)
        contents.append((path, buffer.getvalue()))
    fs.write_files(contents)


def _partner_name(name: str) -> str:
    """diffusers' SDXL script pairs learned_embeds*.ext with learned_embeds_2*.ext (also for -steps-N checkpoints);
    other names pair stem.ext with stem_2.ext."""
    if name.startswith("learned_embeds") and not name.startswith("learned_embeds_2"):
        return "learned_embeds_2" + name[len("learned_embeds"):]
    stem, dot, suffix = name.rpartition(".")
    return f"{stem}_2.{suffix}" if dot else f"{name}_2"


def _primary_name(name: str) -> str | None:
    if name.startswith("learned_embeds_2"):
        return "learned_embeds" + name[len("learned_embeds_2"):]
    stem, dot, suffix = name.rpartition(".")
    if dot and stem.endswith("_2"):
        return f"{stem[:-2]}.{suffix}"
    return None


def _metadata(concept: Concept) -> dict[str, str]:
    """safetensors metadata (strings only): diffusers' ``format`` tag, then what tix knows of the concept. The token
    travels here because emb_params / clip_l+clip_g files are keyed by fixed names and front-ends take the prompt word
    from the file name; tix's reader prefers the original token."""
    p = concept.provenance
    meta = {"format": "pt", "token": concept.token, "vectors": str(concept.num_vectors),
            "tix_version": tix.__version__}
    for key, value in (("steps", p.steps), ("model", p.model), ("model_hash", p.model_hash)):
        if value is not None:
            meta[key] = str(value)
    return meta


def _payloads(concept: Concept, format: str, pickled: bool) -> list[tuple[dict[str, Any], dict[str, str]]]:
    """The contents of the file(s) for one concept: (tensors/object, safetensors metadata) per file."""
    te = concept.vectors["text_encoder"]
    meta = _metadata(concept)
    if format == "diffusers":
        files = [({concept.token: te}, meta)]
        if concept.is_sdxl:
            files.append(({concept.token: concept.vectors["text_encoder_2"]}, meta))
        return files
    if concept.is_sdxl:
        return [({"clip_l": te, "clip_g": concept.vectors["text_encoder_2"]}, meta)]
    if format == "a1111" and pickled:
        p = concept.provenance
        return [({
            "string_to_token": {"*": _A1111_TOKEN_ID},
            "string_to_param": {"*": te},
            "name": concept.token,  # what diffusers and tix take as the token; A1111 prompts use the file name
            "step": p.steps,
            "sd_checkpoint": p.model_hash,
            "sd_checkpoint_name": p.model,
        }, meta)]
    return [({"emb_params": te}, meta)]


def _suffix(format: str, pickled: bool) -> str:
    if not pickled:
        return ".safetensors"
    return ".bin" if format == "diffusers" else ".pt"


def _check_concepts(items: list[Any]) -> None:
    if not items:
        raise EmbeddingFileError("no concepts to write")
    for item in items:
        if not isinstance(item, Concept):
            raise EmbeddingFileError(f"write() takes Concept objects, got {type(item).__name__}")
        for name, v in item.vectors.items():
            if not np.isfinite(v).all():
                raise EmbeddingFileError(
                    f"concept {item.token!r} has NaN or infinite values in its {name} vectors; refusing to export a "
                    "diverged embedding"
                )
    tokens = [c.token for c in items]
    duplicates = sorted({t for t in tokens if tokens.count(t) > 1})
    if duplicates:
        raise EmbeddingFileError(f"several concepts share the token(s) {duplicates}; tokens must be unique")


def _destinations(items: list[Concept], path: Path, format: str, torch_pickle: bool | None, name: str | None,
                  single: bool) -> list[tuple[Concept, Path, bool]]:
    """(concept, first file, pickled) per concept: the file `path` names, or files named after the tokens in the
    folder `path`."""
    suffix = path.suffix.lower()
    is_dir = fs.is_dir(path)
    as_file = single and suffix in (".safetensors", ".pt", ".bin") and not is_dir
    if not as_file and not is_dir and fs.exists(path):
        raise EmbeddingFileError(f"{path} is a file; writing {len(items)} concept(s) needs a folder path")
    if name is not None:
        if not single:
            raise EmbeddingFileError(f"a file name ({name!r}) names one concept's files; {len(items)} concepts are "
                                     "named after their tokens, so leave the name out or export one token")
        if as_file:
            raise EmbeddingFileError(f"both the path {path.name!r} and the name {name!r} name the file; give a folder "
                                     "path with the name, or the file path alone")
        if safe_stem(name) != name:
            raise EmbeddingFileError(f"{name!r} cannot be a file name on every system; use letters, digits, '.', '_' "
                                     f"and '-' (not at either end), e.g. {safe_stem(name)!r}")
    if as_file:
        pickled = suffix != ".safetensors"
        if torch_pickle is not None and torch_pickle != pickled:
            raise EmbeddingFileError(
                f"torch_pickle={torch_pickle} contradicts the file name {path.name!r}; use a .safetensors name for "
                "safetensors or .pt/.bin for a torch pickle"
            )
        return [(items[0], path, pickled)]
    pickled = bool(torch_pickle)
    ext = _suffix(format, pickled)
    stems = [name] if name is not None else output_stems(c.token for c in items)
    if format == "diffusers":
        return [(c, path / stem / f"learned_embeds{ext}", pickled) for c, stem in zip(items, stems, strict=True)]
    return [(c, path / f"{stem}{ext}", pickled) for c, stem in zip(items, stems, strict=True)]


def write(
    concepts: Concept | Iterable[Concept],
    path: str | os.PathLike,
    format: str = "diffusers",
    *,
    torch_pickle: bool | None = None,
    name: str | None = None,
) -> list[Path]:
    """Export concept(s) in `format` ("diffusers", "a1111" or "kohya"); returns the files written.

    One `Concept` and a `path` ending in .safetensors/.pt/.bin: that file (the suffix picks safetensors or a torch
    pickle; a diffusers SDXL concept also writes its ``_2`` partner, e.g. learned_embeds_2.safetensors). Otherwise
    `path` is a folder, holding per concept ``<stem>.safetensors`` (a1111, kohya) or ``<stem>/learned_embeds.*``
    (diffusers), where the stem is `name` (one concept only) or the token made file-safe by `output_stems`
    (``<my-heart>`` -> ``my-heart``): the word A1111 and ComfyUI prompts use, and no token can escape the folder or
    collide.

    `torch_pickle` writes torch pickles (.pt/.bin, needs torch) instead of safetensors. Each concept's `Provenance`
    goes into the safetensors metadata and A1111's .pt fields. Every file is written atomically with the mode the
    umask gives (see `tix.fs.write_files`). Writing an SD 1/2 concept in diffusers form over an SDXL export removes
    the now stale ``learned_embeds_2`` file. `path` may be local or remote (gs://...).
    """
    if format not in FORMATS:
        raise EmbeddingFileError(f"unknown embedding format {format!r}; choose one of {list(FORMATS)}")
    path = fs.path(path)
    single = isinstance(concepts, Concept)
    items = [concepts] if single else list(concepts)
    _check_concepts(items)
    destinations = _destinations(items, path, format, torch_pickle, name, single)

    jobs: list[tuple[Path, Callable[[IO[bytes]], None]]] = []
    for concept, file, pickled in destinations:
        if pickled:
            _torch("writing a PyTorch pickle (.pt/.bin); pass torch_pickle=False or a .safetensors path instead")
        payloads = _payloads(concept, format, pickled)
        targets = [file] if len(payloads) == 1 else [file, file.with_name(_partner_name(file.name))]
        for target, (obj, meta) in zip(targets, payloads, strict=True):
            if pickled:
                jobs.append((target, lambda f, obj=obj: _dump_torch(f, obj)))
            else:
                jobs.append((target, lambda f, obj=obj, meta=meta: _dump_safetensors(f, obj, meta)))
    _atomic_write(jobs)
    if format == "diffusers":
        # A leftover learned_embeds_2 beside a new SD 1/2 file would be read back as its SDXL half.
        for concept, file, _ in destinations:
            stale = file.with_name(_partner_name(file.name))
            if not concept.is_sdxl and stale.is_file():
                stale.unlink()
    return [target for target, _ in jobs]


# ---------------------------------------------------------------------------------------------------------------------
# Reading: containers


class _ParameterDictStandIn:
    """Receives the pickled state of the paper's ``torch.nn.ParameterDict`` without running any torch module code."""

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def items(self):
        state = self.state if isinstance(self.state, dict) else {}
        return dict(state.get("_parameters") or {}).items()


def _refused(path: Path, what: str) -> EmbeddingFileError:
    return EmbeddingFileError(
        f"refusing to load {path}: it is a pickle that references {what}, which is not plain tensor data. Unpickling "
        "can run arbitrary code, so tix only rebuilds tensors and arrays; the file may be malicious. If you trust its "
        "source, convert it to .safetensors with your own tools"
    )


def _load_torch(path: Path) -> Any:
    torch = _torch(f"reading {path.name} (a PyTorch pickle)")
    allow = getattr(torch.serialization, "safe_globals", None)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            if allow is None:
                return torch.load(fs.readable(path), map_location="cpu", weights_only=True)
            with allow([(_ParameterDictStandIn, "torch.nn.modules.container.ParameterDict")]):
                return torch.load(fs.readable(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e), re.IGNORECASE)
        reason = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
        what = (found.group(1) if found else
                f"content torch's weights-only loader rejects ({reason.group(1).strip()})" if reason else
                "objects outside torch's weights-only allowlist")
        raise _refused(path, what) from e
    except Exception as e:
        raise EmbeddingFileError(f"could not read {path} as a PyTorch file: {type(e).__name__}: {e}") from e


def _torch_to_numpy(obj: Any) -> Any:
    """Tensors become numpy arrays, the ParameterDict stand-in a dict; everything else is kept as is."""
    if isinstance(obj, _ParameterDictStandIn):
        return {k: _torch_to_numpy(v) for k, v in obj.items()}
    if isinstance(obj, dict):
        return {k: _torch_to_numpy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_torch_to_numpy(v) for v in obj)
    if type(obj).__module__.startswith("torch") and hasattr(obj, "detach"):
        tensor = obj.detach().cpu()
        if tensor.is_floating_point():
            tensor = tensor.float()
        return tensor.numpy()
    return obj


class _ArrayStandIn:
    """What numpy's pickled ``ndarray`` becomes inside the restricted unpickler: just the recorded state."""

    def __init__(self) -> None:
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _DtypeStandIn:
    def __init__(self, name: Any, align: Any = False, copy: Any = True) -> None:
        self.name, self.byteorder = name, "="

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "=", "|"):
            self.byteorder = state[1]


_NDARRAY = object()
_NUMERIC = {"f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "b1"}


def _reconstruct_stand_in(cls: Any, shape: Any, typecode: Any) -> _ArrayStandIn:
    if cls is not _NDARRAY:
        raise pickle.UnpicklingError("numpy _reconstruct of a class other than numpy.ndarray")
    return _ArrayStandIn()


def _latin1_encode(text: Any, encoding: Any = "latin1") -> bytes:
    # Protocol-2 pickles spell bytes as _codecs.encode(str, "latin1").
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode with unexpected arguments")
    return text.encode("latin1")


class _RestrictedUnpickler(pickle.Unpickler):
    """Allows exactly the globals numpy needs to pickle numeric and object arrays, each mapped to an inert stand-in;
    anything else (os.system, eval, ...) is refused before it can be called."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct_stand_in,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct_stand_in,
        ("numpy", "ndarray"): _NDARRAY,
        ("numpy", "dtype"): _DtypeStandIn,
        ("_codecs", "encode"): _latin1_encode,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"Unsupported global: {module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("Unsupported global: persistent id")


def _materialize(obj: Any) -> Any:
    """Turn the stand-ins the restricted unpickler produced into real numpy arrays, checking every field."""
    if isinstance(obj, dict):
        return {k: _materialize(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_materialize(v) for v in obj]
    if not isinstance(obj, _ArrayStandIn):
        return obj
    state = obj.state
    if not isinstance(state, tuple) or len(state) not in (4, 5):
        raise EmbeddingFileError("malformed numpy array in pickle")
    shape, dtype, fortran, data = state[-4:]
    if not (isinstance(shape, tuple) and all(type(s) is int and s >= 0 for s in shape)):
        raise EmbeddingFileError("malformed numpy array shape in pickle")
    if not isinstance(dtype, _DtypeStandIn) or not isinstance(dtype.name, str):
        raise EmbeddingFileError("malformed numpy dtype in pickle")
    count = int(np.prod(shape, dtype=np.int64))
    if dtype.name in ("O", "O8", "O4"):
        if not isinstance(data, list) or len(data) != count:
            raise EmbeddingFileError("malformed numpy object array in pickle")
        items = [_materialize(v) for v in data]
        if not shape:
            return items[0]
        out = np.empty(count, dtype=object)
        out[:] = items
        return out.reshape(shape, order="F" if fortran else "C")
    if dtype.name not in _NUMERIC or not isinstance(data, (bytes, bytearray)):
        raise EmbeddingFileError(f"numpy dtype {dtype.name!r} in pickle is not a numeric array tix reads")
    np_dtype = np.dtype(dtype.name).newbyteorder(dtype.byteorder if dtype.byteorder != "|" else "=")
    if len(data) != count * np_dtype.itemsize:
        raise EmbeddingFileError("numpy array data in pickle has the wrong size")
    return np.frombuffer(bytes(data), dtype=np_dtype).reshape(shape, order="F" if fortran else "C").astype(
        np_dtype.newbyteorder("="))


def _load_npy(path: Path) -> Any:
    with fs.open_read(path) as f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        except (ValueError, SyntaxError, tokenize.TokenError) as e:  # numpy parses the header as Python literals
            raise EmbeddingFileError(f"{path} is not a valid .npy file: {e}") from e
        if not dtype.hasobject:
            # The header's shape decides how much numpy allocates: refuse one the file cannot hold before it does.
            declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
            available = fs.size(path) - f.tell()
            if declared > available:
                raise EmbeddingFileError(f"{path}: the .npy header declares {declared} bytes of data (shape "
                                         f"{list(shape)}) but the file holds {available}; the file is damaged")
            f.seek(0)
            try:
                return np.load(f, allow_pickle=False)
            except ValueError as e:
                raise EmbeddingFileError(f"{path} is not a valid .npy file: {e}") from e
        try:
            loaded = _RestrictedUnpickler(f).load()
        except pickle.UnpicklingError as e:
            found = re.search(r"Unsupported global: (.+)", str(e))
            raise _refused(path, found.group(1) if found else str(e)) from e
        except Exception as e:
            raise EmbeddingFileError(f"could not read {path} as a pickled numpy array: {type(e).__name__}: {e}") from e
    try:
        # np.save wraps a dict in a 0-d object array, which _materialize unwraps.
        return _materialize(loaded)
    except RecursionError as e:
        raise EmbeddingFileError(f"{path}: the pickled numpy array is nested too deeply to be an embedding") from e


def _load_png(path: Path) -> dict[str, Any]:
    from PIL import Image

    try:
        with Image.open(fs.readable(path)) as image:
            text = dict(getattr(image, "text", {}) or {})
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        # Pillow reports damaged chunks as any of these (SyntaxError: "broken PNG file").
        raise EmbeddingFileError(f"could not read {path} as a PNG: {type(e).__name__}: {e}") from e
    if "sd-ti-embedding" not in text:
        raise EmbeddingFileError(
            f"{path} has no 'sd-ti-embedding' text chunk; embeddings hidden in an image's pixels are not supported. "
            "Load it in AUTOMATIC1111 and use the .pt it saves, or convert it to .safetensors"
        )

    def hook(d: dict) -> Any:
        if "TORCHTENSOR" in d:
            return np.asarray(d["TORCHTENSOR"], dtype=np.float32)
        return d

    try:
        return json.loads(base64.b64decode(text["sd-ti-embedding"]), object_hook=hook)
    except (binascii.Error, ValueError) as e:
        raise EmbeddingFileError(f"{path}: the 'sd-ti-embedding' chunk is not A1111's base64 JSON: {e}") from e


def _load_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    from tix.weights import read_safetensors

    try:
        with fs.open_read(path) as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        metadata = header.get("__metadata__") or {}
        size = fs.size(path) - 8 - header_len
        for name, info in header.items():
            if name != "__metadata__" and (info["data_offsets"][1] > size or info["data_offsets"][0] < 0):
                raise ValueError(f"tensor {name!r} lies outside the file")
        with fs.local_file(path) as local:  # tix reads safetensors memory-mapped (bfloat16 included)
            tensors = {k: np.array(v) for k, v in read_safetensors(local).items()}
    except TixError:
        raise
    except Exception as e:
        raise EmbeddingFileError(f"could not read {path} as safetensors: {type(e).__name__}: {e}") from e
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def _sniff(path: Path) -> str:
    with fs.open_read(path) as f:
        head = f.read(16)
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"PK\x03\x04") and zipfile.is_zipfile(fs.readable(path)):
        return "torch"
    if len(head) >= 9 and head[8:9] == b"{":
        (header_len,) = struct.unpack("<Q", head[:8])
        if 0 < header_len < fs.size(path):
            return "safetensors"  # checked before pickles: a header length of 128 starts with b"\x80" too
    if head[:1] == b"\x80":
        return "torch"  # torch's legacy format and any other pickle: only torch's weights-only unpickler sees it
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "webp"
    return "unknown"


def _load(path: Path) -> tuple[Any, dict[str, str]]:
    """The file's content as a dict/array with tensors as numpy arrays, and its safetensors metadata."""
    kind = _sniff(path)
    if kind == "safetensors":
        return _load_safetensors(path)
    if kind == "torch":
        loaded = _load_torch(path)
        try:
            return _torch_to_numpy(loaded), {}
        except (RuntimeError, TypeError, ValueError) as e:  # tensors numpy cannot hold (quantized, sparse, meta)
            raise EmbeddingFileError(f"{path}: a tensor in the file cannot be read as an array: {e}") from e
    if kind == "npy":
        return _load_npy(path), {}
    if kind == "png":
        return _load_png(path), {}
    if kind == "webp":
        raise EmbeddingFileError(
            f"{path}: A1111 WebP embeddings keep the data in the pixels, which tix does not decode; load it in "
            "AUTOMATIC1111 and use the .pt it saves"
        )
    raise EmbeddingFileError(
        f"{path} is not an embedding file tix recognizes (safetensors, PyTorch .pt/.bin, numpy .npy or A1111 PNG)"
    )


# ---------------------------------------------------------------------------------------------------------------------
# Reading: interpreting the content


def _is_array(value: Any) -> bool:
    return isinstance(value, np.ndarray) and value.dtype != object


def _list_names(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _group_tokens(tensors: dict[str, np.ndarray]) -> list[tuple[str, list[str]]]:
    """Group keys that spell one multi-vector token: diffusers' ``tok, tok_1, tok_2, ...`` or kohya's
    ``tok, tok1, tok2, ...``. Shorter names claim first so a base always collects its parts."""
    order = {k: i for i, k in enumerate(tensors)}
    claimed: set[str] = set()
    groups = []
    for key in sorted(tensors, key=lambda k: (len(k), order[k])):
        if key in claimed:
            continue
        parts = [key]
        for pattern in ("{}_{}", "{}{}"):
            i = 1
            while pattern.format(key, i) in tensors and pattern.format(key, i) not in claimed:
                parts.append(pattern.format(key, i))
                i += 1
            if len(parts) > 1:
                break
        claimed.update(parts)
        groups.append((key, parts))
    groups.sort(key=lambda g: order[g[0]])
    return groups


def _stack(tensors: dict[str, np.ndarray], parts: list[str], where: str) -> np.ndarray:
    pieces = [_as_vectors(tensors[p], f"{where} key {p!r}") for p in parts]
    widths = {p.shape[1] for p in pieces}
    if len(widths) > 1:
        raise EmbeddingFileError(f"{where}: keys {parts} look like one multi-vector token but have widths {widths}")
    return np.concatenate(pieces)


def _count(value: Any) -> int | None:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _provenance(content: Any, metadata: Mapping[str, str]) -> Provenance:
    """What a file records of its concept's making: tix's safetensors metadata, or A1111's .pt fields."""
    if isinstance(content, dict) and "string_to_param" in content:
        return Provenance(_count(content.get("step")), _text(content.get("sd_checkpoint_name")),
                          _text(content.get("sd_checkpoint")))
    return Provenance(_count(metadata.get("steps")), _text(metadata.get("model")), _text(metadata.get("model_hash")))


def _concepts_from_content(content: Any, metadata: Mapping[str, str], path: Path, token: str | None) -> list[Concept]:
    concepts = _concepts_without_provenance(content, metadata, path, token)
    made = _provenance(content, metadata)
    return [Concept(c.token, c.vectors, made) for c in concepts]


def _concepts_without_provenance(content: Any, metadata: Mapping[str, str], path: Path,
                                 token: str | None) -> list[Concept]:
    where = str(path)
    # "name" is where tix wrote the token before it wrote "token".
    fallback = metadata.get("token") or metadata.get("name") or path.stem
    if _is_array(content):
        if token is None:
            raise EmbeddingFileError(
                f"{where} holds a bare tensor of shape {list(content.shape)} with no token name; pass token=..."
            )
        return [Concept(token, {"text_encoder": content})]
    if not isinstance(content, dict):
        raise EmbeddingFileError(f"{where} holds a {type(content).__name__}, not an embedding dict or tensor")
    if not all(isinstance(k, str) for k in content):
        raise EmbeddingFileError(f"{where} has keys that are not names ({_list_names([repr(k) for k in content])})")

    if "string_to_param" in content:
        # A1111 .pt (and PNG) and the paper's embeddings.pt; A1111 refuses files with several terms, so does tix.
        params = content["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            names = list(params) if isinstance(params, dict) else []
            raise EmbeddingFileError(
                f"{where}: string_to_param must hold exactly one placeholder, found {names or type(params).__name__}"
            )
        name = content.get("name")
        name = token or (name if isinstance(name, str) and name else None) or fallback
        return [Concept(name, {"text_encoder": next(iter(params.values()))})]

    if "clip_l" in content or "clip_g" in content:
        if not ("clip_l" in content and "clip_g" in content):
            raise EmbeddingFileError(
                f"{where} has {'clip_l' if 'clip_l' in content else 'clip_g'} but not "
                f"{'clip_g' if 'clip_l' in content else 'clip_l'}; an SDXL embedding needs both encoders' vectors"
            )
        return [Concept(token or fallback, {"text_encoder": content["clip_l"], "text_encoder_2": content["clip_g"]})]

    tensors = {k: v for k, v in content.items() if _is_array(v)}
    others = [k for k in content if k not in tensors]
    if others or not tensors:
        raise EmbeddingFileError(
            f"{where} is not an embedding file tix recognizes: it has keys {_list_names(list(content))} "
            "(expected {token: tensor}, emb_params, clip_l/clip_g or string_to_param)"
        )
    if "emb_params" in tensors and len(tensors) == 1:
        return [Concept(token or fallback, {"text_encoder": tensors["emb_params"]})]

    groups = _group_tokens(tensors)
    if len(groups) == 1:
        base, parts = groups[0]
        return [Concept(token or base, {"text_encoder": _stack(tensors, parts, where)})]
    names = [base for base, _ in groups]
    if token is None:
        raise EmbeddingFileError(
            f"{where} holds {len(groups)} unrelated tokens: {_list_names(names)}; pass token= to pick one"
        )
    for base, parts in groups:
        if base == token:
            return [Concept(base, {"text_encoder": _stack(tensors, parts, where)})]
    raise EmbeddingFileError(f"{where} has no token {token!r}; it holds {_list_names(names)}")


def _read_file(path: Path, token: str | None) -> list[Concept]:
    content, metadata = _load(path)
    concepts = _concepts_from_content(content, metadata, path, token)
    partner_pair = _diffusers_pair(path, content)
    if partner_pair is not None:
        first, second = partner_pair
        c1 = _concepts_from_content(*_load(first), first, token) if first != path else concepts
        c2 = _concepts_from_content(*_load(second), second, token) if second != path else concepts
        return [Concept(c1[0].token, {"text_encoder": c1[0].vectors["text_encoder"],
                                      "text_encoder_2": c2[0].vectors["text_encoder"]}, c1[0].provenance)]
    return concepts


def _single_token_key(content: Any) -> str | None:
    if isinstance(content, dict) and len(content) == 1:
        (key, value), = content.items()
        if _is_array(value) and key not in ("emb_params", "clip_l", "clip_g", "string_to_param"):
            return key
    return None


def _diffusers_pair(path: Path, content: Any) -> tuple[Path, Path] | None:
    """If `path` is one half of diffusers' SDXL two-file form (same token in learned_embeds*.ext and its _2 file),
    the (text_encoder file, text_encoder_2 file)."""
    key = _single_token_key(content)
    if key is None:
        return None
    candidates = [(path, path.with_name(_partner_name(path.name)))]
    primary = _primary_name(path.name)
    if primary is not None:
        candidates.append((path.with_name(primary), path))
    for first, second in candidates:
        other = second if first == path else first
        if other.is_file():
            try:
                other_content, _ = _load(other)
            except TixError:
                continue
            if _single_token_key(other_content) == key:
                return first, second
    return None


def _read_folder(folder: Path, token: str | None) -> list[Concept]:
    for ext in (".safetensors", ".bin", ".npy"):
        first = folder / f"learned_embeds{ext}"
        if first.is_file():
            concepts = _concepts_from_content(*_load(first), first, token)
            second = next((folder / f"learned_embeds_2{e}" for e in (".safetensors", ".bin")
                           if (folder / f"learned_embeds_2{e}").is_file()), None)
            if second is None:
                return concepts
            other = _concepts_from_content(*_load(second), second, token)
            if token is None and other[0].token != concepts[0].token:
                raise EmbeddingFileError(
                    f"{folder}: learned_embeds and learned_embeds_2 hold different tokens "
                    f"({concepts[0].token!r} and {other[0].token!r}); they are not one SDXL embedding"
                )
            return [Concept(concepts[0].token, {"text_encoder": concepts[0].vectors["text_encoder"],
                                                "text_encoder_2": other[0].vectors["text_encoder"]},
                            concepts[0].provenance)]

    # A folder of exports: one file per concept, or one diffusers subfolder per concept.
    concepts: list[Concept] = []
    sources: dict[str, Path] = {}
    seen: set[Path] = set()
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".") or entry in seen:
            continue
        if entry.is_dir():
            if not any((entry / f"learned_embeds{e}").is_file() for e in (".safetensors", ".bin", ".npy")):
                continue
            found = _read_folder(entry, None)
        elif entry.suffix.lower() in _EMBEDDING_SUFFIXES:
            content, metadata = _load(entry)
            pair = _diffusers_pair(entry, content)
            if pair is not None:
                seen.update(pair)
            found = _read_file(entry, None)
        else:
            continue
        for concept in found:
            if concept.token in sources:
                raise EmbeddingFileError(
                    f"{folder}: token {concept.token!r} is in both {sources[concept.token].name} and {entry.name}"
                )
            sources[concept.token] = entry
            concepts.append(concept)
    if not concepts:
        raise EmbeddingFileError(f"{folder} contains no embedding files")
    if token is not None:
        chosen = [c for c in concepts if c.token == token]
        if not chosen:
            raise EmbeddingFileError(
                f"{folder} has no concept {token!r}; it holds {_list_names([c.token for c in concepts])}"
            )
        return chosen
    return concepts


def read(path: str | os.PathLike, *, token: str | None = None) -> list[Concept]:
    """Read the concept(s) in an embedding file or folder, detecting the format from the bytes.

    `token`: for a bare tensor, the token to use (required); for files that hold one concept, a new name for it (as
    diffusers' ``load_textual_inversion(token=...)`` does); for files or folders holding several, which one to return.
    Without `token`, A1111 files use their ``name`` field, emb_params / clip_l+clip_g files the name tix wrote in their
    metadata or else the file name (as A1111 and ComfyUI do), and diffusers files their key.

    `path` may also be a Hugging Face Hub id ("sd-concepts-library/cat-toy"), read from huggingface_hub's cache.
    """
    from tix import hub

    if hub.is_hub_id(path):
        concepts = _read_folder(hub.concept_folder(os.fspath(path)), token)
    elif fs.is_dir(path := fs.path(path)):
        concepts = _read_folder(path, token)
    elif not path.is_file():
        raise EmbeddingFileError(
            f"embedding file {path} does not exist, and it is not a Hub id of the form 'owner/name'"
        )
    else:
        concepts = _read_file(path, token)
    for concept in concepts:
        for name, vectors in concept.vectors.items():
            if not np.isfinite(vectors).all():
                raise EmbeddingFileError(f"{path}: {concept.token!r} ({name}) holds nan or infinite values; the "
                                         "embedding is damaged (a diverged training run?) and would give blank images")
    return concepts
