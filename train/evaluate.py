"""`tix eval`: score learned words with the paper's CLIP protocol (and the toy world's scorer), from run folders or
embedding files; writes eval.json and eval.html with the samples.

The protocol and the figures are `tix.evaluation` and `tix.metrics`; this module finds the concepts, their training
images and their tokens, and writes the results.
"""

from __future__ import annotations

import dataclasses
import html
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tix import fs
from tix.embedding_files import safe_stem
from tix.errors import ConfigError, TixError
from tix.evaluation import Protocol, Subject, evaluate_subjects
from tix.pipeline import StableDiffusion
from train import data
from train.config import TrainConfig
from train.report import eval_table, grid, write_html

GRID_SAMPLES = 16  # samples per prompt shown on the page


def read_references(folder: fs.PathLike) -> tuple[np.ndarray, ...]:
    """The training images of a concept folder as uint8 RGB arrays (unreadable files skipped with a warning)."""
    folder = fs.path(folder)
    if not fs.is_dir(folder):
        raise ConfigError(f"{folder}: not a folder of training images (a run's config.yaml names its folders relative "
                          "to where it was trained: run tix eval from there, or pass --images for an embedding file)")
    files = sorted(p for p in fs.listdir(folder) if p.suffix.lower() in data.IMAGE_SUFFIXES)
    images = [data.load_image(p) for p in files]
    return tuple(np.asarray(im) for im in images if im is not None)


def run_subjects(sd: StableDiffusion, run: fs.Path) -> list[Subject]:
    """A run folder's concepts, their learned tokens added to `sd`, with the run's training images."""
    from train.invert import exported_embeddings

    cfg = TrainConfig.from_yaml(fs.read_text(run / "config.yaml"))
    exported = exported_embeddings(run)
    names = set(sd.load_embeddings(exported))
    subjects = []
    for spec in data.concept_specs(cfg):
        if spec.token not in names:
            raise TixError(f"{run}: concept {spec.token} has no exported vectors in {exported}")
        style = cfg.style if spec.style is None else spec.style
        subjects.append(Subject(spec.token, spec.token, read_references(spec.images), bool(style)))
    return subjects


def gather_subjects(sd: StableDiffusion, sources: Sequence[str], *, images: str | None = None,
                    phrases: Sequence[str] = (), style: bool = False) -> list[Subject]:
    """Subjects for `tix eval`: every concept of each run folder or embedding file in `sources`, then the phrases
    ("TOKEN=a caption") evaluated as that token's concept with the caption in its place."""
    subjects: list[Subject] = []
    for source in sources:
        path = fs.path(source)
        if fs.exists(path / "config.yaml"):
            subjects += run_subjects(sd, path)
            continue
        names = sd.load_embeddings(source)
        if images and len(names) > 1:
            raise ConfigError(f"--images gives one concept's training images, but {source} holds {len(names)} "
                              "tokens; evaluate its run folder instead, or one token at a time")
        references = read_references(images) if images else ()
        subjects += [Subject(name, name, references, style) for name in names]
    by_token = {s.concept: s for s in subjects}
    for item in phrases:
        token, sep, phrase = item.partition("=")
        if not sep or token not in by_token or not phrase.strip():
            raise ConfigError(f"--phrase {item!r}: write TOKEN=PHRASE with one of the tokens evaluated "
                              f"({', '.join(by_token) or 'none'}), e.g. --phrase '<my-cat>=a ginger cat'")
        subjects.append(dataclasses.replace(by_token[token], phrase=phrase.strip()))
    if not subjects:
        raise TixError("nothing to evaluate: give a run folder or an embedding file")
    return subjects


def write_outputs(out: fs.Path, summary: dict[str, Any], subjects: Sequence[Subject],
                  images: dict[tuple[int, str], np.ndarray]) -> fs.Path:
    """eval.json, eval/<subject>/<prompt>.png grids and eval.html showing them beside the figures."""
    out.mkdir(parents=True, exist_ok=True)
    fs.write_text(out / "eval.json", json.dumps(summary, indent=2) + "\n")
    parts = ["<!doctype html><meta charset=utf-8><title>tix eval</title>",
             "<style>body{font-family:sans-serif;margin:2em}img{image-rendering:pixelated}"
             "td,th{vertical-align:top;padding:4px 8px;text-align:left}td:first-child{min-width:14em}</style>",
             f"<h1>tix eval: {html.escape(summary['model'])}</h1>",
             f"<p>{html.escape(_protocol_line(summary))}</p>", eval_table(summary["results"])]
    for s, (subject, result) in enumerate(zip(subjects, summary["results"], strict=True)):
        folder = f"eval/{s:02d}-{safe_stem(subject.label)[:60]}"
        parts.append(f"<h2>{html.escape(subject.label)}</h2><table>")
        for t, template in enumerate(key for i, key in images if i == s):
            samples = images[s, template]
            name = f"{folder}/{t}.png"
            fs.save_image(grid(samples[:GRID_SAMPLES], min(8, len(samples))), out / name)
            figure = result.get("prompts", {}).get(template, {})
            figures = ", ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in figure.items())
            parts.append(f"<tr><td>{html.escape(template.format(subject.phrase))}<br><small>{figures}</small></td>"
                         f"<td><img src='{name}' height=128></td></tr>")
        parts.append("</table>")
    return fs.write_text(out / "eval.html", "\n".join(parts))


def _protocol_line(summary: dict[str, Any]) -> str:
    p = summary["protocol"]
    return (f"{p['samples']} samples per prompt, {p['sampler']} {p['steps']} steps, guidance {p['guidance']}; "
            f"CLIP: {summary.get('clip') or 'none'}; {summary['seconds']:.0f} s")


def run_eval(sources: Sequence[str], *, model: str, clip: str | None, out: str | None, protocol: Protocol,
             images: str | None = None, phrases: Sequence[str] = (), style: bool = False, dtype: str = "float32",
             progress: bool = True) -> Path:
    """The whole `tix eval` command; returns the folder written."""
    import tix

    toyworld = model == "toyworld"
    if clip is None and not toyworld:
        raise ConfigError("tix eval needs a CLIP model: --clip openai/clip-vit-base-patch32 (the paper's) or a local "
                          "CLIPModel folder; only the toy world can be scored without one")
    if out is None:
        if len(sources) != 1 or not fs.exists(fs.path(sources[0]) / "config.yaml"):
            raise ConfigError("--out is needed unless a single run folder is evaluated (its eval.json then sits "
                              "beside its report.html)")
        out = sources[0]
    start = time.perf_counter()
    sd = tix.load(model, dtype)
    subjects = gather_subjects(sd, sources, images=images, phrases=phrases, style=style)
    scorer = tix.load_clip(clip, dtype) if clip else None
    results, samples = evaluate_subjects(sd, subjects, protocol, clip=scorer, toyworld=toyworld, progress=progress)
    summary = {"model": model, "clip": clip, "protocol": dataclasses.asdict(protocol),
               "seconds": time.perf_counter() - start, "results": results}
    folder = fs.path(out)
    write_outputs(folder, summary, subjects, samples)
    if fs.exists(folder / "report.html") and fs.exists(folder / "config.yaml"):
        write_html(folder)  # the run's report shows the new figures
    return folder
