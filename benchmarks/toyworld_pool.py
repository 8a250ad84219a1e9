"""Several toy-world benchmark runs read as one: the concepts of every run (different draws, seeds or lists) pooled
into one table, trade-off table and edit table, so that a comparison too close for one draw's interval gets the
concepts of several.

    python benchmarks/toyworld_pool.py RUN RUN [...] [--out DIR]   # folders benchmarks/toyworld.py wrote with --out

The runs must follow one protocol (the same model, steps, batch, learning rate, init_reg, samples, training images,
shared context and --set fields); they may differ in which concepts they drew. A concept of one run is a different
concept from a namesake in another (other images, another context), so each keeps its run's folder in its name. The
methods pooled are those every run scored. --pair A B adds A's lead over B on every axis with a 95% interval over
concepts. With --out, writes table.md, trade_off.md, edits.md, scatter.png (and leads.md) there, as the benchmark
does for one run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import toyworld as bench  # noqa: E402
from tix.toyworld import evaluate, world  # noqa: E402

# What makes two runs' scores comparable; which concepts they drew (draw, concepts, seed, only) may differ.
PROTOCOL = ("model", "images", "steps", "batch", "lr", "samples", "init_reg", "init", "shared", "set")
# What picks a run's concepts and images: two runs alike in all of these scored the same concepts twice.
DRAW = ("draw", "concepts", "seed")


def check_runs(runs: dict[str, dict]) -> None:
    """Refuse runs that followed different protocols, or that drew the same concepts (pooling them would count those
    concepts twice), naming the setting and the runs."""
    (first, a), *rest = runs.items()
    for name, b in rest:
        differ = [k for k in PROTOCOL if a["args"].get(k) != b["args"].get(k)]
        if differ:
            raise ValueError(f"{first} and {name} followed different protocols ({', '.join(differ)} differ); pool "
                             "runs made with the same settings, which may differ only in --draw/--concepts/--seed")
    seen: dict[tuple, str] = {}
    for name, r in runs.items():
        draw = tuple(r["args"].get(k) for k in DRAW)
        if draw in seen and set(r["concepts"]) & set(runs[seen[draw]]["concepts"]):
            raise ValueError(f"{seen[draw]} and {name} drew the same concepts ({', '.join(DRAW)} alike); pooling "
                             "them would count those concepts twice")
        seen[draw] = name


def read(runs: dict[str, dict]) -> tuple[dict[tuple[str, str], evaluate.Score], list[world.Concept], list[str],
                                          dict[str, dict[str, str]]]:
    """Every run's per-concept scores as the benchmark holds them, each concept renamed "RUN:NAME"; the concepts, the
    methods every run scored (in the first run's order) and each concept's shared context."""
    methods = [m for m in runs[next(iter(runs))]["summary"] if all(m in r["summary"] for r in runs.values())]
    scores, concepts, contexts = {}, [], {}
    for run, r in runs.items():
        for name, info in r["concepts"].items():
            concept = world.Concept(f"{run}:{name}", info["fixed"])
            concepts.append(concept)
            contexts[concept.name] = info.get("shared", {})
            for method in methods:
                s = dict(r["per_concept"][f"{name}|{method}"])
                s["by_edit"] = {e: tuple(hn) for e, hn in s.get("by_edit", {}).items()}
                scores[concept.name, method] = evaluate.Score(**s)
    return scores, concepts, methods, contexts


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="folders benchmarks/toyworld.py wrote with --out")
    p.add_argument("--out", type=Path, help="write table.md, trade_off.md, edits.md and scatter.png here")
    p.add_argument("--pair", nargs=2, action="append", default=[], metavar=("FIRST", "SECOND"),
                   help="also FIRST's lead over SECOND on every axis (e.g. --pair tix-1v caption-long)")
    args = p.parse_args(argv)
    runs = {}
    for folder in args.runs:
        path = folder / "results.json"
        if not path.is_file():
            p.error(f"{path}: not found; give the folders benchmarks/toyworld.py wrote with --out")
        runs[folder.name if folder.name not in runs else str(folder)] = json.loads(path.read_text())
    try:
        check_runs(runs)
    except ValueError as e:
        p.error(str(e))
    scores, concepts, methods, contexts = read(runs)
    unknown = sorted({m for pair in args.pair for m in pair} - set(methods))
    if unknown:
        p.error(f"--pair: {', '.join(unknown)} not scored by every run; they all scored {', '.join(methods)}")
    shared = any(contexts.values())
    summary = bench.summarise(scores, concepts, methods)
    outputs = {"table.md": bench.table(summary, shared), "trade_off.md": bench.trade_off_table(scores, concepts),
               "edits.md": bench.edit_table(scores, concepts, methods, contexts)}
    if args.pair:
        outputs["leads.md"] = bench.lead_table(scores, concepts, [tuple(pair) for pair in args.pair],
                                               ("reconstruction", "editability", "resemblance", "obeyed"))
    groups = bench.concept_groups(concepts)
    print(f"{len(runs)} runs, {len(concepts)} concepts ({len(groups['named'])} named, {len(groups['unnamed'])} "
          f"unnamed), {summary[methods[0]]['all'].samples} samples of each kind for {methods[0]}\n")
    shown = [outputs["table.md"], outputs.get("leads.md", ""), outputs["edits.md"].split("\n\n")[0]]
    if len(outputs["trade_off.md"].splitlines()) > 2:  # a pair of TRADE_OFF that every run scored
        shown.insert(1, outputs["trade_off.md"])
    print("\n\n".join(t for t in shown if t))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        for name, text in outputs.items():
            (args.out / name).write_text(text + "\n")
        bench.scatter(summary, args.out / "scatter.png", shared)
        (args.out / "runs.txt").write_text("".join(f"{f}\n" for f in args.runs))
        print(f"\nwrote {', '.join(outputs)}, scatter.png and runs.txt to {args.out}")


if __name__ == "__main__":
    main()
