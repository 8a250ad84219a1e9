"""What a run shows its user: metrics.jsonl, TensorBoard events, validation grids, the loss curve and report.html."""

from __future__ import annotations

import dataclasses
import html
import io
import json
import time

import numpy as np
from PIL import Image

from tix import fs
from train.tensorboard import EventWriter


class MetricsLog:
    """Appends one JSON line per logged step and mirrors scalars to TensorBoard.

    An object store cannot append to an object, so under a remote `out` the lines and event records are kept in
    memory and the whole files are rewritten at most every `flush_seconds` and on close (a resumed run first reads
    the lines already there; its events go to a new event file, which TensorBoard reads after the old one)."""

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
            if self.remote:
                self._text = fs.read_text(self.path) if fs.exists(self.path) else ""
            self.writer = EventWriter(out / "tensorboard")

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        line = json.dumps({"step": step, "time": time.time(), **values}) + "\n"
        self.writer.add_scalars(step, values)
        if self.remote:
            self._text += line
            self._dirty = True
            if time.monotonic() - self._flushed >= self.flush_seconds:
                self.flush()
        else:
            with self.path.open("a") as f:
                f.write(line)

    def flush(self) -> None:
        if self.remote and self._dirty:
            fs.write_text(self.path, self._text)
            self.writer.flush()
            self._dirty = False
        self._flushed = time.monotonic()

    def close(self) -> None:
        self.flush()
        if self.writer is not None:
            self.writer.close()


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



def _smooth(values: np.ndarray) -> tuple[np.ndarray, int]:
    """A trailing moving average over about a twentieth of the points (at least 2), and its window."""
    k = max(2, len(values) // 20)
    if len(values) <= k:
        return values, 1
    return np.convolve(values, np.ones(k) / k, mode="valid"), k


# Past this many concepts a legend no longer fits beside the plot (matplotlib could not lay out 48 names in 7
# columns) nor tells 16 colours apart; each concept's own curve is then in metrics.jsonl.
MAX_LEGEND = 16


def loss_curve(out: fs.PathLike) -> fs.Path | None:
    """loss.png: the run's loss and, when it trained several concepts, each concept's (smoothed) curve."""
    rows = [r for r in read_metrics(out) if "loss" in r]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([r["step"] for r in rows])
    concepts = sorted({k[len("loss/"):] for r in rows for k in r if k.startswith("loss/")})
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    loss = np.array([r["loss"] for r in rows])
    if len(concepts) <= 1:
        ax.plot(steps, loss, alpha=0.35, label=f"loss{' of ' + concepts[0] if concepts else ''}")
        smooth, k = _smooth(loss)
        if k > 1:
            ax.plot(steps[k - 1:], smooth, label=f"mean of {k}")
    else:
        for name in concepts:
            have = [(r["step"], r[f"loss/{name}"]) for r in rows if f"loss/{name}" in r]
            smooth, k = _smooth(np.array([v for _, v in have]))
            ax.plot(np.array([s for s, _ in have])[k - 1:], smooth, label=name, linewidth=1)
        ax.set_title(f"per-concept loss of {len(concepts)} concepts, mean of {max(2, len(rows) // 20)} logged steps",
                     fontsize=9)
    ax.set_xlabel("step")
    ax.set_ylabel("diffusion loss")
    if len(concepts) <= MAX_LEGEND:
        ax.legend(fontsize=7, ncol=1 + len(concepts) // 8, loc="upper right")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return fs.write_bytes(fs.path(out) / "loss.png", buffer.getvalue())


def timing(rows: list[dict]) -> dict[str, float]:
    """Steps, seconds between the first and last logged step, and images/s (mean and last) from metrics rows."""
    rows = [r for r in rows if "loss" in r]
    if not rows:
        return {}
    rates = [r["images_per_s"] for r in rows if "images_per_s" in r]
    out = {"steps": float(rows[-1]["step"]), "seconds": float(rows[-1]["time"] - rows[0]["time"])}
    if rates:
        out.update(images_per_s=float(np.mean(rates)), last_images_per_s=float(rates[-1]))
    return out


def eval_table(results: list[dict]) -> str:
    """An HTML table of `tix eval`'s headline figures per subject (eval.html and the run report share it)."""
    columns = [("image similarity", lambda r: r.get("image_similarity")),
               ("text similarity", lambda r: r.get("text_similarity")),
               ("toy reconstruction", lambda r: r.get("toyworld", {}).get("reconstruction")),
               ("toy resemblance", lambda r: r.get("toyworld", {}).get("resemblance")),
               ("toy editability", lambda r: r.get("toyworld", {}).get("editability")),
               ("toy edit obeyed", lambda r: r.get("toyworld", {}).get("edit_obeyed"))]
    columns = [(name, get) for name, get in columns if any(get(r) is not None for r in results)]
    rows = ["<table class=grid><tr><th>concept</th><th>phrase</th>" +
            "".join(f"<th>{n}</th>" for n, _ in columns) + "</tr>"]
    for r in results:
        cells = "".join("<td>" + ("-" if get(r) is None else f"{get(r):.3f}") + "</td>" for _, get in columns)
        rows.append(f"<tr><td>{html.escape(r['concept'])}</td><td>{html.escape(r['phrase'])}</td>{cells}</tr>")
    return "\n".join(rows) + "</table>"


_STYLE = ("<style>body{font-family:sans-serif;margin:2em;max-width:1100px}img{image-rendering:pixelated}"
          "td,th{vertical-align:top;padding:2px 8px;text-align:left}table.grid{border-collapse:collapse}"
          "table.grid td,table.grid th{border-bottom:1px solid #ddd}.cols{display:grid;font-size:13px;"
          "color:#333;text-align:center}.config{columns:3;font-size:12px;font-family:monospace}"
          ".config div{break-inside:avoid}.changed{font-weight:bold}.muted{color:#666}</style>")


def _config_html(config: dict) -> str:
    """Every field of the resolved config; those that differ from TrainConfig's defaults in bold."""
    from train.config import TrainConfig

    defaults = dataclasses.asdict(TrainConfig())
    items = []
    for key, value in config.items():
        changed = " class=changed" if defaults.get(key, object()) != value else ""
        items.append(f"<div{changed}>{html.escape(key)}: {html.escape(json.dumps(value))}</div>")
    return "<div class=config>" + "".join(items) + "</div>"


def _thumbnails(out: fs.Path, stem: str, folder: str, size: int = 96) -> list[str]:
    """Small copies of a concept's training images inside the run folder (the originals may be elsewhere or gone);
    returns their paths relative to the run."""
    from train import data

    source = fs.path(folder)
    if not fs.is_dir(source):
        return []
    names = []
    for i, file in enumerate(sorted(p for p in fs.listdir(source) if p.suffix.lower() in data.IMAGE_SUFFIXES)):
        image = data.load_image(file)
        if image is None:
            continue
        image.thumbnail((size, size), Image.Resampling.LANCZOS)
        name = f"report/{stem}/train-{i}.png"
        fs.save_image(image, out / name)
        names.append(name)
    return names


def _concepts(config: dict) -> list[tuple[str, str, bool]]:
    """(token, image folder, style) of every concept the run's config names (nothing if they cannot be listed)."""
    from train import data
    from train.config import TrainConfig

    try:
        cfg = TrainConfig(**config)
        return [(s.token, s.images, bool(cfg.style if s.style is None else s.style)) for s in data.concept_specs(cfg)]
    except Exception:  # a report must not fail a finished run: a moved concept folder only loses the thumbnails
        return []


def _lr_phrase(config: dict) -> str:
    """", learning rate X" with the batch scaling spelled out when the run scales it."""
    if "lr" not in config:
        return ""
    if not config.get("scale_lr", True):
        return f", learning rate {config['lr']:g}"
    scale = config.get("batch_size", 1) * config.get("grad_accum", 1)
    return f", learning rate {config['lr']:g} x {scale} = {config['lr'] * scale:g}"


def _validation_prompts(config: dict, style: bool) -> list[str]:
    from tix import templates

    if config.get("validation_prompts"):
        return list(config["validation_prompts"])
    return list(templates.VALIDATION_STYLE if style else templates.VALIDATION_OBJECT)


def write_html(out: fs.PathLike, title: str | None = None, concepts: list[str] | None = None,
               prompts: list[str] | None = None) -> fs.Path:
    """report.html, from what the run folder holds: the concepts' training images, the validation grids over time
    with each column's prompt, per-concept loss curves, time and images/s, `tix eval`'s figures (eval.json) when
    present, and the resolved config. `concepts` and `prompts` default to what config.yaml says."""
    import yaml

    from tix.embedding_files import output_stems

    out = fs.path(out)
    config = yaml.safe_load(fs.read_text(out / "config.yaml")) if fs.exists(out / "config.yaml") else {}
    listed = _concepts(config) if config else []
    tokens = concepts or [t for t, _, _ in listed]
    folders = {t: (f, st) for t, f, st in listed}
    title = title or f"tix invert: {', '.join(tokens)}"
    parts = [f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title>", _STYLE,
             f"<h1>{html.escape(title)}</h1>"]
    metrics = read_metrics(out)  # one read: on an object store each is a request
    facts = timing(metrics)
    if facts:
        line = f"{int(facts['steps'])} steps in {facts['seconds']:.0f} s (first to last logged step)"
        if "images_per_s" in facts:
            line += f", {facts['images_per_s']:.2f} images/s (last {facts['last_images_per_s']:.2f})"
        parts.append(f"<p>{line}; model {html.escape(str(config.get('model', '?')))}, "
                     f"{len(tokens)} concept(s){_lr_phrase(config)}.</p>")
    if fs.exists(out / "eval.json"):
        summary = json.loads(fs.read_text(out / "eval.json"))
        p = summary.get("protocol", {})
        parts.append(f"<h2>Evaluation</h2><p class=muted>tix eval: {p.get('samples')} samples per prompt, "
                     f"{p.get('sampler')} {p.get('steps')} steps, guidance {p.get('guidance')}, CLIP "
                     f"{html.escape(str(summary.get('clip') or 'none'))}; samples in "
                     "<a href='eval.html'>eval.html</a></p>" + eval_table(summary.get("results", [])))
    if fs.exists(out / "loss.png"):
        parts.append('<h2>Loss</h2><img src="loss.png">')
    val = out / "validation"
    # One listing per step folder rather than one existence check per image (each is a request on an object store).
    grids = {int(p.name.split("-")[1]): {q.name for q in fs.listdir(p)}
             for p in (fs.listdir(val) if fs.is_dir(val) else []) if p.name.startswith("step-")}
    parts.append("<h2>Concepts</h2>")
    last = {k: v for row in metrics for k, v in row.items() if k.startswith("norm_vs_words/")}
    for token, stem in zip(tokens, output_stems(tokens), strict=True):
        folder, style = folders.get(token, (None, bool(config.get("style"))))
        parts.append(f"<h3>{html.escape(token)}</h3>")
        if f"norm_vs_words/{stem}" in last:
            parts.append(f"<p class=muted>vectors {last[f'norm_vs_words/{stem}']:.1f}x the norm of an ordinary word "
                         "at the last logged step</p>")
        thumbs = _thumbnails(out, stem, folder) if folder else []
        if thumbs:
            parts.append(f"<p class=muted>training images ({html.escape(str(folder))})</p><p>" +
                         "".join(f"<img src='{t}' height=96> " for t in thumbs) + "</p>")
        columns = prompts or _validation_prompts(config, style)
        seeds = config.get("validation_seeds")
        header = "".join(f"<div>{html.escape(c.format(token))}</div>" for c in columns)
        rows = [f"<tr><td>step {step}</td><td><div class=cols style='grid-template-columns:repeat({len(columns)},"
                f"1fr);width:512px'>{header}</div><img src='validation/step-{step:06d}/{_safe(token)}.png' "
                "width=512></td></tr>"
                for step in sorted(grids) if f"{_safe(token)}.png" in grids[step]]
        if rows:
            parts.append(f"<p class=muted>validation samples: one column per prompt, one row per seed"
                         f"{f' ({seeds} seeds)' if seeds else ''}, the same noise at every step</p>"
                         "<table>" + "".join(rows) + "</table>")
    if config:
        parts.append("<h2>Config</h2><p class=muted>config.yaml as resolved; bold: changed from tix's defaults"
                     "</p>" + _config_html(config))
    return fs.write_text(out / "report.html", "\n".join(parts))


def _safe(token: str) -> str:
    from tix.embedding_files import safe_stem

    return safe_stem(token)
