"""What a run shows its user: metrics.jsonl, TensorBoard events, validation grids, the loss curve and report.html."""

from __future__ import annotations

import html
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image


class MetricsLog:
    """Appends one JSON line per logged step and mirrors scalars to TensorBoard."""

    def __init__(self, out: Path, enabled: bool = True):
        self.path = out / "metrics.jsonl"
        self.enabled = enabled
        self.writer = None
        if enabled:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(out / "tensorboard"))

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def grid(images: np.ndarray, columns: int) -> Image.Image:
    """uint8 [N, H, W, 3] -> one image, `columns` wide."""
    n, h, w, _ = images.shape
    rows = -(-n // columns)
    canvas = np.full((rows * h, columns * w, 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, columns)
        canvas[r * h:(r + 1) * h, c * w:(c + 1) * w] = im
    return Image.fromarray(canvas)


def loss_curve(out: Path) -> Path | None:
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
    path = out / "loss.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def write_html(out: Path, title: str, concepts: list[str], prompts: list[str]) -> Path:
    """report.html: the loss curve and, per concept, the validation grids over time."""
    parts = [f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;margin:2em}img{image-rendering:pixelated;max-width:100%}"
             "td{vertical-align:top;padding:4px}</style>",
             f"<h1>{html.escape(title)}</h1>"]
    if (out / "loss.png").exists():
        parts.append('<h2>Loss</h2><img src="loss.png">')
    val = out / "validation"
    steps = sorted({int(p.name.split("-")[1]) for p in val.glob("step-*")}) if val.exists() else []
    parts.append("<h2>Validation</h2><p>Columns: " + " | ".join(html.escape(p) for p in prompts) +
                 " (fixed seeds, one row per seed)</p>")
    for name in concepts:
        parts.append(f"<h3>{html.escape(name)}</h3><table>")
        for step in steps:
            img = f"validation/step-{step:06d}/{_safe(name)}.png"
            if (out / img).exists():
                parts.append(f"<tr><td>step {step}</td><td><img src='{img}' width=512></td></tr>")
        parts.append("</table>")
    path = out / "report.html"
    path.write_text("\n".join(parts))
    return path


def _safe(token: str) -> str:
    from tix.embedding_files import safe_stem

    return safe_stem(token)
