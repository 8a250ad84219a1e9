"""Many concepts in one run against one run per concept, as wall-clock including start-up and compilation (prints
figures; not a test).

    python benchmarks/many_concepts.py --concepts 8 --steps 50 [--model DIR] [--separate K] \
        [-- more tix invert arguments, e.g. --config configs/sd15.yaml]

Each run is a fresh `tix invert` process, as a user would start it, and each way starts with an empty compilation
cache (the separate runs share theirs, so only the first compiles). The default model is the tiny SD1-like test
pipeline (built once into a temporary folder). `--separate K` times only the first K separate runs and counts each
of the rest as the last timed one (K >= 2: a warm run), where N whole runs would not fit the time at hand; 0 times
the single run alone (its seconds per step and start-up are printed either way).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.processes import ROOT, metrics_rows, step_timing, timed, tix_invert  # noqa: E402


def _invert(args: list[str], cache: Path, log: Path) -> float:
    return timed(*tix_invert(*args, "--set", f"compile_cache={cache}"), log, cwd=ROOT)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--concepts", type=int, default=8)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--model", default=None, help="default: the tiny SD1-like test pipeline")
    p.add_argument("--images-per-concept", type=int, default=5)
    p.add_argument("--separate", type=int, default=None, metavar="K",
                   help="time K of the separate runs (default: all), count the rest as the last timed one")
    p.add_argument("tix_args", nargs=argparse.REMAINDER, help="-- then more `tix invert` arguments")
    args = p.parse_args()
    extra = [a for a in args.tix_args if a != "--"]

    from PIL import Image

    from tix.toyworld import world

    work = Path(tempfile.mkdtemp(prefix="tix-many-"))
    model = args.model
    if model is None:
        from tests import tiny

        model = str(tiny.build("sd1", work / "model"))
    concepts = world.benchmark_concepts()
    root = work / "concepts"
    for i in range(args.concepts):
        folder = root / f"c{i:02d}"
        folder.mkdir(parents=True)
        for j, image in enumerate(world.concept_images(concepts[i % len(concepts)], args.images_per_concept, seed=i)):
            Image.fromarray(image).save(folder / f"{j}.png")
    common = ["--model", model, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
              "--validate-every", "0", "--save-every", str(args.steps), "--init", "object", *extra]
    started = time.time()
    together = _invert(["--concepts", str(root), "--out", str(work / "together"), *common,
                        "--set", f"concepts_per_step={args.concepts}"], work / "cache-together", work / "together.log")
    figures = {"concepts": args.concepts, "steps": args.steps, "batch_per_concept": args.batch_size,
               "one_run_s": together}
    timing = step_timing(metrics_rows(work / "together"), started)  # None below two logged steps (log_every: 10)
    if timing is not None:
        per_step, startup = timing
        figures.update(one_run_s_per_step=per_step, one_run_images_per_s=args.concepts * args.batch_size / per_step,
                       one_run_startup_s=startup)
    count = args.concepts if args.separate is None else min(args.separate, args.concepts)
    alone = [_invert(["--images", str(root / f"c{i:02d}"), "--token", f"<c{i:02d}>", "--out", str(work / f"alone{i}"),
                      *common], work / "cache-separate", work / f"alone{i}.log") for i in range(count)]
    if alone:
        separate = sum(alone) + (args.concepts - len(alone)) * alone[-1]
        figures.update(separate_runs_s=separate, ratio=separate / together, separate_timed=[round(t, 2) for t in alone],
                       separate_estimated=len(alone) < args.concepts)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}))


if __name__ == "__main__":
    main()
