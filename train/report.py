"""What a run shows its user: metrics.jsonl, TensorBoard events, validation grids, the loss curve and report.html."""

from __future__ import annotations

import html
import io
import json
import time

import numpy as np
from PIL import Image

from tix import fs


class MetricsLog:
    """Appends one JSON line per logged step and mirrors scalars to TensorBoard.

    An object store cannot append to an object, so under a remote `out` the lines are kept in memory and the whole
    file is rewritten at most every `flush_seconds` and on close (a resumed run first reads the lines already there)."""

    def __init__(self, out: fs.PathLike, enabled: bool = True, flush_seconds: float = 30.0):
        out = fs.path(out)
        self.path = out / "metrics.jsonl"
        self.enabled = enabled
        self.remote = fs.is_remote(out)
        self.flush_seconds = flush_seconds
        self.writer = None
        self._text = ""
        self._dirty = False
        self._flushed = time.monotonic()
        if enabled:
            from tensorboardX import SummaryWriter

            if self.remote:
                _route_tensorboard(fs.scheme(out))
                self._text = fs.read_text(self.path) if fs.exists(self.path) else ""
            self.writer = SummaryWriter(str(out / "tensorboard"))

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        line = json.dumps({"step": step, "time": time.time(), **values}) + "\n"
        if self.remote:
            self._text += line
            self._dirty = True
            if time.monotonic() - self._flushed >= self.flush_seconds:
                self.flush()
        else:
            with self.path.open("a") as f:
                f.write(line)
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def flush(self) -> None:
        if self.remote and self._dirty:
            fs.write_text(self.path, self._text)
            self._dirty = False
        self._flushed = time.monotonic()

    def close(self) -> None:
        self.flush()
        if self.writer is not None:
            self.writer.close()


class _ObjectRecordWriter:
    """tensorboardX's event-file writer for remote folders, through tix.fs: events are buffered and the whole file is
    rewritten on each flush (tensorboardX flushes every couple of minutes and on close)."""

    def __init__(self, path: str):
        self.path = path
        self.buffer = io.BytesIO()

    def write(self, data: bytes) -> None:
        self.buffer.write(data)

    def flush(self) -> None:
        fs.write_bytes(self.path, self.buffer.getvalue())

    def close(self) -> None:
        self.flush()


class _ObjectRecordWriterFactory:
    def open(self, path: str) -> _ObjectRecordWriter:
        return _ObjectRecordWriter(path)

    def directory_check(self, path: str) -> None:
        pass  # object stores have no folders to create


def _route_tensorboard(scheme: str | None) -> None:
    # tensorboardX picks a writer by the path's scheme; its own gs:// writer talks to GCS by itself, which would be a
    # second filesystem layer with its own credentials and failure modes.
    from tensorboardX import record_writer

    record_writer.register_writer_factory(scheme, _ObjectRecordWriterFactory())


def read_metrics(out: fs.PathLike) -> list[dict]:
    path = fs.path(out) / "metrics.jsonl"
    return [json.loads(line) for line in fs.read_text(path).splitlines()] if fs.exists(path) else []


def grid(images: np.ndarray, columns: int) -> Image.Image:
    """uint8 [N, H, W, 3] -> one image, `columns` wide."""
    n, h, w, _ = images.shape
    rows = -(-n // columns)
    canvas = np.full((rows * h, columns * w, 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, columns)
        canvas[r * h:(r + 1) * h, c * w:(c + 1) * w] = im
    return Image.fromarray(canvas)


def loss_curve(out: fs.PathLike) -> fs.Path | None:
    rows = [r for r in read_metrics(out) if "loss" in r]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([r["step"] for r in rows])
    loss = np.array([r["loss"] for r in rows])
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, loss, alpha=0.35, label="loss")
    if len(loss) > 4:
        k = max(2, len(loss) // 20)
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], smooth, label=f"mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("diffusion loss")
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return fs.write_bytes(fs.path(out) / "loss.png", buffer.getvalue())


def write_html(out: fs.PathLike, title: str, concepts: list[str], prompts: list[str]) -> fs.Path:
    """report.html: the loss curve and, per concept, the validation grids over time."""
    out = fs.path(out)
    parts = [f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;margin:2em}img{image-rendering:pixelated;max-width:100%}"
             "td{vertical-align:top;padding:4px}</style>",
             f"<h1>{html.escape(title)}</h1>"]
    if fs.exists(out / "loss.png"):
        parts.append('<h2>Loss</h2><img src="loss.png">')
    val = out / "validation"
    # One listing per step folder rather than one existence check per image (each is a request on an object store).
    grids = {int(p.name.split("-")[1]): {q.name for q in fs.listdir(p)}
             for p in (fs.listdir(val) if fs.is_dir(val) else []) if p.name.startswith("step-")}
    steps = sorted(grids)
    parts.append("<h2>Validation</h2><p>Columns: " + " | ".join(html.escape(p) for p in prompts) +
                 " (fixed seeds, one row per seed)</p>")
    for name in concepts:
        parts.append(f"<h3>{html.escape(name)}</h3><table>")
        for step in steps:
            img = f"validation/step-{step:06d}/{_safe(name)}.png"
            if f"{_safe(name)}.png" in grids[step]:
                parts.append(f"<tr><td>step {step}</td><td><img src='{img}' width=512></td></tr>")
        parts.append("</table>")
    return fs.write_text(out / "report.html", "\n".join(parts))


def _safe(token: str) -> str:
    from tix.embedding_files import safe_stem

    return safe_stem(token)
