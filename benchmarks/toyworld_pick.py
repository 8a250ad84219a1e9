"""Can the training objective tell which of several runs learned a concept best? `tix pick` (train/pick.py) over
toy-world benchmark runs, its picks scored: for every concept each run learned with one vector, the pick's
reconstruction / editability beside the first run's, the best-scored run's and the long caption's.

    python benchmarks/toyworld_pick.py RUN RUN [...]   # folders benchmarks/toyworld.py wrote with --out

The runs must share the concept draw and images (the same --draw/--concepts, --seed and --images); they may differ
in anything else (learning rate, --set fields). Each must hold its `tix-1v` vectors and their scores.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from train.pick import pick_runs  # noqa: E402

SHARED_ARGS = ("model", "concepts", "draw", "seed", "images", "shared")
COLUMNS = ("first run", "picked by loss", "best-scored", "caption-long")


def _score(results: dict, name: str, method: str) -> tuple[float, float]:
    s = results["per_concept"][f"{name}|{method}"]
    return s["reconstruction"], s["editability"]


def table(results: list[dict], picks: dict[str, int]) -> str:
    """Mean reconstruction / editability per group of the runs' first, picked and best-scored tix-1v tokens."""
    rows = {group: {c: [] for c in COLUMNS} for group in ("named", "unnamed")}
    for name, pick in picks.items():
        scores = [_score(r, name, "tix-1v") for r in results]
        group = rows["unnamed" if results[0]["concepts"][name]["unnamed"] else "named"]
        for column, score in zip(COLUMNS, (scores[0], scores[pick], max(scores, key=sum),
                                           _score(results[0], name, "caption-long")), strict=True):
            group[column].append(score)
    lines = ["| group | concepts | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 2) + "|"]
    for group, columns in rows.items():
        if columns["first run"]:
            means = [np.mean(columns[c], axis=0) for c in COLUMNS]
            lines.append(f"| {group} | {len(columns['first run'])} | "
                         + " | ".join(f"{r:.2f} / {e:.2f}" for r, e in means) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="benchmark output folders (--out), at least two")
    p.add_argument("--repeats", type=int, default=8, help="fixed draws per view and tenth of the schedule")
    p.add_argument("--seed", type=int, default=0, help="the fixed draws' seed: a pick that moves with it is a tie")
    args = p.parse_args(argv)
    if len(args.runs) < 2:
        p.error("give at least two runs to choose between")
    results = [json.loads((folder / "results.json").read_text()) for folder in args.runs]
    for folder, r in zip(args.runs[1:], results[1:], strict=True):
        differ = [k for k in SHARED_ARGS if r["args"].get(k) != results[0]["args"].get(k)]
        if differ:
            p.error(f"{folder} drew different concepts or images from {args.runs[0]} ({', '.join(differ)} differ)")
    folders = [str(folder / "runs" / "base") for folder in args.runs]
    with tempfile.TemporaryDirectory() as tmp:
        summary = pick_runs(folders, Path(tmp) / "picked", repeats=args.repeats, seed=args.seed)
    picks = {}
    for token, result in summary["concepts"].items():
        name, method = token.strip("<>").split("@", 1)
        if method == "tix-1v" and all(f"{name}|tix-1v" in r["per_concept"] for r in results):
            picks[name] = list(result["losses"]).index(result["picked"])
            losses = " ".join(f"{x:.5f}" for x in result["losses"].values())
            scores = " ".join("{:.2f}/{:.2f}".format(*_score(r, name, "tix-1v")) for r in results)
            print(f"{name}: losses {losses}  scores {scores}  pick {picks[name]}")
    print()
    print(table(results, picks))


if __name__ == "__main__":
    main()
