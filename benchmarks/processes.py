"""Whole processes as the benchmarks time them: a program run to its end with its output in a log, `tix invert` from
this checkout, and the step times a run's metrics.jsonl gives (peers.py, one_concept.py and many_concepts.py share
these)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tix_invert(*args: str) -> tuple[list[str], dict[str, str]]:
    """The command line and extra environment of `tix invert ARGS` from this checkout."""
    return [sys.executable, "-m", "tix.cli", "invert", *args], {"PYTHONPATH": str(ROOT)}


def timed(command: list[str], env: dict[str, str], log: Path, cwd: Path | None = None) -> float:
    """Wall seconds of one whole process run in `cwd` (default: the log's folder); its output goes to `log`."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1", **env}
    start = time.perf_counter()
    with log.open("w") as sink:
        done = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, env=full_env, cwd=cwd or log.parent)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{command[:3]} failed (status {done.returncode}); see {log}")
    return seconds


def metrics_rows(out: Path) -> list[dict]:
    """The step lines of a run's metrics.jsonl (none before its first step is logged)."""
    metrics = out / "metrics.jsonl"
    if not metrics.exists():
        return []
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [r for r in rows if "time" in r and "step" in r]


def step_timing(rows: list[dict], started: float) -> tuple[float, float] | None:
    """(seconds per step, start-up) of a run started at `started` (time.time()): marginal between the first and last
    logged steps, and the start-up extrapolated back to the end of step 1. None with fewer than two logged steps."""
    first, last = rows[0], rows[-1]
    if last["step"] <= first["step"]:
        return None
    per_step = (last["time"] - first["time"]) / (last["step"] - first["step"])
    return per_step, first["time"] - started - (first["step"] - 1) * per_step
