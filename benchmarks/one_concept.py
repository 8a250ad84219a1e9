"""One concept end to end, as a user runs it: a whole `tix invert` process from start to its exports (prints figures;
not a test).

    python benchmarks/one_concept.py --model DIR --images DIR [--log-every 50] -- --config configs/sd15.yaml ...

First with an empty compilation cache (a user's first run): wall seconds in all, the start-up before the first
step (load, latent encoding, compile), marginal seconds per step read off metrics.jsonl, and the tail after the
last step (checkpoint, exports, report). Then the same command again with the cache the first run left, stopped at
its first step: the warm start-up, and the whole warm run as that start-up plus the first run's steps and tail.
Everything after `--` goes to `tix invert` unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.processes import ROOT, metrics_rows, step_timing, timed, tix_invert  # noqa: E402


def _command(args: argparse.Namespace, out: Path, cache: Path, log_every: int) -> tuple[list[str], dict[str, str]]:
    return tix_invert("--model", args.model, "--images", args.images, "--token", "<concept>", "--out", str(out),
                      *args.tix_args, "--set", f"compile_cache={cache}", "--set", f"log_every={log_every}")


def cold_run(args: argparse.Namespace, work: Path, cache: Path) -> dict:
    """The whole process with an empty cache; start-up is extrapolated back to step 1 from the first logged step."""
    out = work / "cold"
    started = time.time()
    total = timed(*_command(args, out, cache, args.log_every), work / "cold.log", cwd=ROOT)
    rows = metrics_rows(out)
    timing = step_timing(rows, started)
    if timing is None:
        raise SystemExit(f"one metrics line only; give --log-every well under the run's {rows[-1]['step']} steps")
    per_step, startup = timing
    return {"steps": rows[-1]["step"], "cold_total_s": total, "s_per_step": per_step,
            "images_per_s": args.images_per_step / per_step if args.images_per_step else None,
            "cold_startup_s": startup, "tail_s": started + total - rows[-1]["time"]}


def warm_startup(args: argparse.Namespace, work: Path, cache: Path, limit_s: float = 600) -> float:
    """Seconds from process start to the first step's metrics line with the cache warm (the run is then killed)."""
    out = work / "warm"
    command, env = _command(args, out, cache, 1)
    started = time.time()
    with (work / "warm.log").open("w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env}, cwd=ROOT)
        try:
            while time.time() - started < limit_s:
                rows = metrics_rows(out)
                if rows:
                    return rows[0]["time"] - started
                if proc.poll() is not None:
                    raise SystemExit(f"the warm run ended before its first step; see {work / 'warm.log'}")
                time.sleep(0.1)
            raise SystemExit(f"no first step within {limit_s} s; see {work / 'warm.log'}")
        finally:
            proc.kill()
            proc.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--log-every", type=int, default=50, help="metrics lines every N steps in the timed run")
    p.add_argument("--images-per-step", type=int, default=0, help="to print images/s too (the run's batch size)")
    p.add_argument("--work", type=Path, help="keep the runs and their logs here (default: a temporary folder)")
    p.add_argument("tix_args", nargs=argparse.REMAINDER, help="-- then `tix invert` arguments")
    args = p.parse_args()
    args.tix_args = [a for a in args.tix_args if a != "--"]
    work = args.work or Path(tempfile.mkdtemp(prefix="tix-one-concept-"))
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "compile-cache"
    figures = cold_run(args, work, cache)
    figures["warm_startup_s"] = warm_startup(args, work, cache)
    figures["warm_total_s"] = figures["cold_total_s"] - figures["cold_startup_s"] + figures["warm_startup_s"]
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}), flush=True)


if __name__ == "__main__":
    main()
