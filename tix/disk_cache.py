"""A folder of results that take seconds to derive but depend only on tix's own code, the libraries' versions and a
description of what was derived (a compiled train step, a model's parameter shapes), so the next process with the
same inputs reads them instead of tracing the model again.

Every key hashes the source of tix and train, so an edited or upgraded tix never reads what an older one wrote; an
entry that cannot be read back is derived again (and dropped or replaced). Entries are written to a temporary name
and renamed, so two processes sharing the folder never see half an entry.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import sys
import tempfile
from importlib import metadata
from pathlib import Path

log = logging.getLogger(__name__)

_PACKAGES = ("tix", "train")
_LIBRARIES = ("jax", "jaxlib", "flax", "optax", "numpy", "ml_dtypes")


def default_folder() -> Path:
    """The user cache folder ($XDG_CACHE_HOME/tix/jax, else ~/.cache/tix/jax)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tix" / "jax"


_DEFAULT = "default"
# The folder in use: the default until `use` moves it (tix invert's `compile_cache` setting); None: the cache is off.
_folder: Path | None | str = _DEFAULT


def use(folder: Path | None) -> None:
    global _folder
    _folder = folder


def folder() -> Path | None:
    return default_folder() if _folder == _DEFAULT else _folder


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """A hash of every source file of tix and train, the versions of the libraries that trace and compile them, and
    the settings that change what XLA builds."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parents[1]
    for package in _PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    for name in _LIBRARIES:
        try:
            h.update(f"{name}={metadata.version(name)}".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{name}=none".encode())
    h.update(sys.version.encode())
    h.update(os.environ.get("XLA_FLAGS", "").encode())
    return h.hexdigest()


def key(kind: str, description: str) -> str:
    """The file name of an entry: what kind it is, and a hash of the code and the description."""
    digest = hashlib.sha256(f"{code_fingerprint()}\n{kind}\n{description}".encode()).hexdigest()
    return f"{kind}-{digest[:40]}"


def read(name: str) -> bytes | None:
    where = folder()
    if where is None:
        return None
    try:
        return (where / name).read_bytes()
    except OSError:
        return None


def write(name: str, data: bytes) -> None:
    """Store an entry; a folder that cannot be written only costs the next process the time to derive it again."""
    where = folder()
    if where is None:
        return
    temporary = None
    try:
        where.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=where, prefix=f".{name}.", delete=False) as f:
            temporary = f.name
            f.write(data)
        os.replace(temporary, where / name)
    except OSError as err:
        log.debug("could not write %s to %s: %s", name, where, err)
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)


def remove(name: str) -> None:
    """Drop an entry that could not be used, so no later process reads it again."""
    where = folder()
    if where is not None:
        (where / name).unlink(missing_ok=True)
