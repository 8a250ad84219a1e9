"""A concept library: a folder of learned concepts on orbax, each with its vectors for every text encoder and the
facts needed to trust it later (base model, a hash of the embedding table it was trained against, training settings,
a hash of the training images).

Each concept is its own orbax checkpoint folder. Orbax writes into a temporary folder and renames it when complete
(on gs://, where renames are copies, it writes in place and adds commit_success.txt last), and readers skip anything
unfinished, so a process killed while adding a concept leaves every other concept intact. The root may be local or
remote (gs://...): every access goes through tix.fs.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import os
import re
from collections.abc import Iterable
from typing import Any

import numpy as np
import orbax.checkpoint as ocp

import tix
from tix import fs
from tix.embedding_files import Concept, Provenance, safe_stem
from tix.errors import TixError

_ENTRY_NAME = re.compile(r"[A-Za-z0-9._-]+-[0-9a-f]{8}")
_ORBAX_TMP = ".orbax-checkpoint-tmp"
_COMMIT_FILE = "commit_success.txt"  # orbax's finished-marker where it cannot rename (atomicity_types)

META_FIELDS = ("token", "base_model", "family", "table_hash", "vectors", "init", "style", "steps", "lr",
               "images_hash", "date", "tix_version")


def table_hash(table: np.ndarray) -> str:
    """A short hash identifying a text encoder's token-embedding table (so a token is used with its own model)."""
    return hashlib.sha256(np.ascontiguousarray(np.asarray(table, np.float32)).tobytes()).hexdigest()[:16]


def files_hash(paths: Iterable[fs.PathLike]) -> str:
    digest = hashlib.sha256()
    for path in sorted(fs.path(p) for p in paths):
        digest.update(path.name.encode())
        digest.update(fs.read_bytes(path))
    return digest.hexdigest()[:16]


def base_model(source: str) -> str:
    """What the library records as a run's base model: a local folder as its absolute path (a relative one means
    nothing once the working folder changes), a Hub id, "toyworld" or a gs:// path as given."""
    if not fs.is_remote(source) and os.path.isdir(source):
        return os.fspath(fs.absolute(source))
    return source


def model_name(base: str | None) -> str | None:
    """The base model as exports name it (A1111's sd_checkpoint_name): a Hub id or "toyworld" as given, a folder by its
    own name, never its full path (a shared embedding would publish the trainer's directory layout)."""
    if not base:
        return None
    if fs.is_remote(base) or os.path.isabs(base) or base.startswith("."):
        return fs.path(base).name or base
    return base


def provenance(meta: dict[str, Any]) -> Provenance:
    """An entry's provenance, as its exported files record it."""
    steps, hashes = meta.get("steps"), meta.get("table_hash")
    return Provenance(steps=steps if isinstance(steps, int) and not isinstance(steps, bool) and steps >= 0 else None,
                      model=model_name(meta.get("base_model")),
                      model_hash=hashes.get("text_encoder") if isinstance(hashes, dict) else None)


def _run_meta(sd: Any, cfg: Any) -> dict[str, Any]:
    """The provenance every concept of a run shares."""
    from tix.models.clip import token_table

    return {"base_model": base_model(sd.source), "family": sd.kind, "steps": cfg.steps, "lr": cfg.lr,
            "table_hash": {side.name: table_hash(token_table(sd.params[side.name])) for side in sd.text}}


def run_provenance(sd: Any, cfg: Any) -> Provenance:
    """What a finished run's exports record: the steps it trained, its base model and the model's table hash (the
    same facts `add_run` stores)."""
    return provenance(_run_meta(sd, cfg))


@dataclasses.dataclass(frozen=True)
class Entry:
    concept: Concept
    meta: dict[str, Any]
    path: fs.Path


def _complete(folder: fs.Path) -> bool:
    if not (_ENTRY_NAME.fullmatch(folder.name) and not folder.name.endswith(_ORBAX_TMP) and folder.is_dir()):
        return False
    names = {p.name for p in fs.listdir(folder)}
    return {"meta", "vectors"} <= names and (not fs.is_remote(folder) or _COMMIT_FILE in names)


def _checkpointer() -> ocp.Checkpointer:
    # In a multi-host run every process calls save and orbax's primary host (process 0) alone writes.
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


class Library:
    """The concepts under `root`, one orbax folder each."""

    def __init__(self, root: fs.PathLike):
        self.root = fs.absolute(root)

    def _folders(self) -> list[fs.Path]:
        if not fs.is_dir(self.root):
            return []
        # Finished orbax saves are renamed into place as `<stem>-<8 hex>`; unfinished ones end in
        # ".orbax-checkpoint-tmp" and folders being removed in ".tmp-deleting". Matching the whole entry name (rather
        # than looking for "tmp" anywhere) keeps tokens such as "<tmp-cat>" listed.
        return sorted(p for p in self.root.iterdir() if _complete(p))

    def entries(self) -> list[Entry]:
        out = []
        for folder in self._folders():
            try:
                out.append(self.read(folder))
            except Exception as err:  # a damaged entry must not hide the others
                import warnings

                warnings.warn(f"skipping unreadable concept folder {folder}: {err}", stacklevel=2)
        return out

    def is_entry(self, folder: fs.PathLike) -> bool:
        """Whether `folder` is one finished concept of this library."""
        folder = fs.absolute(folder)
        return folder.parent == self.root and _complete(folder)

    def read(self, folder: fs.PathLike) -> Entry:
        """The concept stored in `folder` (one of this library's entry folders)."""
        fs.check_supported(folder, checkpoints=True)
        folder = fs.absolute(folder)
        restored = _checkpointer().restore(
            folder, args=ocp.args.Composite(vectors=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore())
        )
        vectors = {k: np.asarray(v, np.float32) for k, v in restored["vectors"].items()}
        meta = dict(restored["meta"])
        return Entry(Concept(meta["token"], vectors, provenance(meta)), meta, folder)

    def get(self, token: str) -> Entry:
        # The folder name is a function of the token, so one concept is read without restoring all the others.
        folder = self._folder_for(token)
        if _complete(folder):
            entry = self.read(folder)
            if entry.concept.token == token:
                return entry
        known = [e.concept.token for e in self.entries()]
        shown = ", ".join(known[:20]) + (f", ... ({len(known)} in all)" if len(known) > 20 else "")
        raise TixError(f"no concept {token!r} in the library {self.root} (it holds: {shown or 'none'})")

    def _folder_for(self, token: str) -> fs.Path:
        digest = hashlib.sha256(token.encode()).hexdigest()[:8]
        return self.root / f"{safe_stem(token)}-{digest}"

    def add(self, concept: Concept, meta: dict[str, Any], *, replace: bool = False) -> fs.Path:
        fs.check_supported(self.root, checkpoints=True)
        folder = self._folder_for(concept.token)
        if self._holds(folder):
            if not replace:
                raise TixError(f"the library {self.root} already holds {concept.token!r}; remove it first "
                               f"(tix concepts rm) or add with replace")
            self.remove(concept.token)
        elif fs.is_remote(folder) and fs.exists(folder):
            # A save killed midway: on gs:// orbax writes in place, and would refuse the existing folder.
            self._delete(folder)
        meta = {**{k: None for k in META_FIELDS}, **meta, "token": concept.token,
                "vectors": concept.num_vectors, "tix_version": tix.__version__,
                "date": meta.get("date") or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        self.root.mkdir(parents=True, exist_ok=True)
        vectors = {k: np.asarray(v, np.float32) for k, v in concept.vectors.items()}
        _checkpointer().save(folder, args=ocp.args.Composite(vectors=ocp.args.StandardSave(vectors),
                                                             meta=ocp.args.JsonSave(meta)))
        return folder

    def _holds(self, folder: fs.Path) -> bool:
        # Locally an unfinished save has another name, so the name alone says the concept is there.
        return _complete(folder) if fs.is_remote(folder) else fs.exists(folder)

    def remove(self, token: str) -> None:
        self._delete(self.get(token).path)

    def _delete(self, folder: fs.Path) -> None:
        import jax

        if jax.process_index() == 0:  # one writer in a multi-host run
            if fs.is_remote(folder):
                # A folder rename on an object store copies every object; instead drop the commit marker first (one
                # object, so at once), which makes the folder unfinished to every reader before its data goes.
                (folder / _COMMIT_FILE).unlink(missing_ok=True)
                fs.rmtree(folder)
            else:
                # Rename first so a crash mid-delete never leaves a half-deleted folder that looks like a concept.
                trash = folder.with_name(folder.name + ".tmp-deleting")
                if trash.exists():  # left by an earlier remove that was killed
                    fs.rmtree(trash)
                folder.rename(trash)
                fs.rmtree(trash)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"tix library: removed {folder.name}")

    def merge(self, other: Library, *, replace: bool = False) -> list[str]:
        """Copy every concept of `other` into this library; returns the tokens added."""
        added = []
        for entry in other.entries():
            if self._holds(self._folder_for(entry.concept.token)) and not replace:
                continue
            self.add(entry.concept, entry.meta, replace=replace)
            added.append(entry.concept.token)
        return added


def add_run(
    root: fs.PathLike, sd: Any, cfg: Any, prepared: list[Any], learned: dict[str, dict[str, np.ndarray]]
) -> Library:
    """Record a finished run's concepts, with their provenance, in the library at `root`. Every process of a
    multi-host run calls this (orbax coordinates them); only process 0 writes."""
    library = Library(root)
    shared = _run_meta(sd, cfg)
    for p in prepared:
        c = p.concept
        meta = {**shared, "init": c.init, "style": c.style, "images_hash": files_hash(c.images)}
        library.add(Concept(c.token, learned[c.token]), meta, replace=True)
    return library
