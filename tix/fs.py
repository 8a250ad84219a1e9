"""One filesystem layer for every path a user gives tix: local folders and object stores (``gs://bucket/...``).

Paths are `etils.epath.Path` objects: on local paths they call `os`/`shutil`, on ``gs://`` they go through
TensorFlow's gfile when TensorFlow is installed and otherwise through fsspec + gcsfs (``pip install 'tix[gcs]'``).
Orbax takes the same objects and writes ``gs://`` natively (its array data goes through TensorStore's GCS driver).

Libraries that only open real files (PIL, torch, zipfile, numpy memmaps) get a file object of the bytes or a local
copy from here; nothing else in tix should call `open`, `pathlib.Path` or `shutil` on a path the user chose.

Writes never leave a partial file under the final name: locally the data goes to a temporary file in the same folder,
is flushed to disk and renamed into place; an object store publishes a single-object write all at once, so there the
object is written directly (a rename there is a copy, which is slower and no safer). Local files get the mode the
umask gives, as open() would, not the 0600 of the temporary file.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import tempfile
import threading
from collections.abc import Iterator, Sequence
from typing import IO, TYPE_CHECKING

from etils import epath

from tix.errors import TixError

if TYPE_CHECKING:
    from PIL import Image

Path = epath.Path
PathLike = str | os.PathLike

# What each remote scheme needs at run time: (any one of these for files, every one of these for orbax checkpoints).
_NEEDS = {
    "gs": (("gcsfs", "tensorflow"), ("google.cloud.storage",)),
}
_SCHEMES = ("gs", "s3", "az", "hf")
_PIL_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP"}


def scheme(p: PathLike) -> str | None:
    """The URI scheme of `p` ("gs" for gs://bucket/x), or None for a local path."""
    text = os.fspath(p)
    head, sep, _ = text.partition("://")
    return head if sep and head in _SCHEMES else None


def is_remote(p: PathLike) -> bool:
    return scheme(p) is not None


def path(p: PathLike) -> epath.Path:
    """`p` as an epath.Path (local paths stay as given, relative ones included)."""
    text = os.fspath(p)
    for s in _SCHEMES:
        # pathlib.Path("gs://b/x") collapses the double slash; restore it so such a path still reaches the bucket.
        if text.startswith(f"{s}:/") and not text.startswith(f"{s}://"):
            text = f"{s}://" + text[len(s) + 2:]
    return epath.Path(text)


def absolute(p: PathLike) -> epath.Path:
    """Local paths made absolute (orbax requires it); remote ones are absolute already."""
    p = path(p)
    return p if is_remote(p) else p.absolute()


def missing_packages(p: PathLike, *, checkpoints: bool = False) -> list[str]:
    """The packages `p`'s scheme needs that are not installed (files; with `checkpoints`, orbax's too)."""
    s = scheme(p)
    if s not in _NEEDS:
        return []
    any_of, all_of = _NEEDS[s]
    missing = [] if any(_installed(m) for m in any_of) else [" or ".join(any_of)]
    if checkpoints:
        missing += [m for m in all_of if not _installed(m)]
    return missing


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, e.g. google.cloud
        return False


def check_supported(p: PathLike, *, checkpoints: bool = False) -> None:
    """Refuse early, naming the path and the fix, when a remote path cannot be used in this environment."""
    missing = missing_packages(p, checkpoints=checkpoints)
    if missing:
        raise TixError(f"{os.fspath(p)}: {scheme(p)}:// paths need {', '.join(missing)}, which "
                       f"{'is' if len(missing) == 1 else 'are'} not installed; pip install 'tix[gcs]'")


@contextlib.contextmanager
def _reading(p: epath.Path) -> Iterator[None]:
    """Turn an object store's failures (credentials, network, a bucket that does not exist) into a TixError naming
    the path; a missing local file stays a FileNotFoundError as before."""
    try:
        yield
    except (TixError, FileNotFoundError):
        raise
    except Exception as err:
        if not is_remote(p):
            raise
        raise TixError(f"cannot read {p}: {type(err).__name__}: {err}") from err


def _query(p: PathLike, method: str):
    """`path(p).<method>()` after the remote-support check, with remote failures named (see `_reading`)."""
    p = path(p)
    check_supported(p)
    with _reading(p):
        return getattr(p, method)()


def exists(p: PathLike) -> bool:
    return _query(p, "exists")


def is_dir(p: PathLike) -> bool:
    return _query(p, "is_dir")


def listdir(p: PathLike) -> list[epath.Path]:
    """The entries of folder `p`, sorted by name (one listing request on an object store)."""
    p = path(p)
    with _reading(p):
        return sorted(p.iterdir(), key=lambda q: q.name)


def read_bytes(p: PathLike) -> bytes:
    return _query(p, "read_bytes")


def read_text(p: PathLike) -> str:
    return read_bytes(p).decode("utf-8")


def size(p: PathLike) -> int:
    p = path(p)
    with _reading(p):
        return os.path.getsize(p) if not is_remote(p) else p.stat().length


def readable(p: PathLike) -> str | IO[bytes]:
    """Something PIL, torch, zipfile and numpy can open: a local path as its string, a remote file as its bytes in
    memory (tix reads small files this way: images, embeddings, captions)."""
    p = path(p)
    return os.fspath(p) if not is_remote(p) else io.BytesIO(read_bytes(p))


def open_read(p: PathLike) -> IO[bytes]:
    """`p` opened for reading bytes: the file itself when local, its bytes in memory when remote."""
    source = readable(p)
    return open(source, "rb") if isinstance(source, str) else source


@contextlib.contextmanager
def local_file(p: PathLike) -> Iterator[str]:
    """A local file name holding `p`'s bytes, for readers that need a real file (memory maps): `p` itself when it is
    local, else a temporary copy removed afterwards."""
    p = path(p)
    if not is_remote(p):
        yield os.fspath(p)
        return
    data = read_bytes(p)
    fd, tmp = tempfile.mkstemp(suffix=p.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        yield tmp
    finally:
        os.unlink(tmp)


def _umask() -> int:
    # Linux reports the umask without changing it; elsewhere set-and-restore, which is safe while no other thread of
    # this process creates files at that instant (locked so tix's own threads never race each other).
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


_UMASK_LOCK = threading.Lock()


def new_file_mode() -> int:
    """The permission bits a file created now with open() gets: 0o666 less the process umask (0644 under the usual
    022), so exports in a shared folder or behind a web server are readable as the user's other files are."""
    return 0o666 & ~_umask()


def write_files(items: Sequence[tuple[PathLike, bytes]]) -> list[epath.Path]:
    """Write every (path, bytes), creating folders. Locally all files go to temporaries first and are renamed into
    place only once every one is complete, so a failure leaves the previous files untouched; on an object store each
    object is written whole (readers see the old or the new object, never part of one)."""
    targets = [path(p) for p, _ in items]
    for target in targets:
        check_supported(target)
    temps: list[tuple[str, epath.Path]] = []
    try:
        for target, (_, data) in zip(targets, items, strict=True):
            target.parent.mkdir(parents=True, exist_ok=True)
            if is_remote(target):
                target.write_bytes(data)
                continue
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
            temps.append((tmp, target))
            os.fchmod(fd, new_file_mode())  # mkstemp makes 0600; the file gets what open() would have given it
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for tmp, target in temps:
            os.replace(tmp, target)
    finally:
        for tmp, _ in temps:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return targets


def write_bytes(p: PathLike, data: bytes) -> epath.Path:
    """Write `p` atomically (see `write_files`)."""
    return write_files([(p, data)])[0]


def write_text(p: PathLike, text: str) -> epath.Path:
    return write_bytes(p, text.encode("utf-8"))


def save_image(image: Image.Image, p: PathLike, format: str | None = None) -> epath.Path:
    """Encode `image` (format from the suffix unless given) and write it atomically."""
    p = path(p)
    buffer = io.BytesIO()
    image.save(buffer, format=format or _PIL_FORMATS.get(p.suffix.lower(), "PNG"))
    return write_bytes(p, buffer.getvalue())


def rmtree(p: PathLike) -> None:
    """Remove folder `p` and everything in it; nothing to do if it does not exist."""
    path(p).rmtree(missing_ok=True)
