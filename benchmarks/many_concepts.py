"""Many concepts in one run against one run per concept, as wall-clock including start-up and compilation (prints
figures; not a test).

    python benchmarks/many_concepts.py --concepts 8 --steps 50 [--model DIR]

Each run is a fresh `tix invert` process, as a user would start it. The default model is the tiny SD1-like test
pipeline (built once into a temporary folder).
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _invert(args: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "tix.cli", "invert", *args], check=True, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--concepts", type=int, default=8)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--model", default=None, help="default: the tiny SD1-like test pipeline")
    args = p.parse_args()

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
        for j, image in enumerate(world.concept_images(concepts[i % len(concepts)], 5, seed=i)):
            Image.fromarray(image).save(folder / f"{j}.png")
    common = ["--model", model, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
              "--validate-every", "0", "--save-every", str(args.steps), "--init", "object"]
    together = _invert(["--concepts", str(root), "--out", str(work / "together"), *common,
                        "--set", f"concepts_per_step={args.concepts}"])
    separate = sum(
        _invert(["--images", str(root / f"c{i:02d}"), "--token", f"<c{i:02d}>", "--out", str(work / f"alone{i}"),
                 *common])
        for i in range(args.concepts)
    )
    print(json.dumps({"concepts": args.concepts, "steps": args.steps, "batch_per_concept": args.batch_size,
                      "one_run_s": together, "separate_runs_s": separate, "ratio": separate / together}))


if __name__ == "__main__":
    main()
