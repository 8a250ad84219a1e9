"""Score a toy-world run's final validation grid with the toy world's scorer, beside the initializer word's samples.

    python scripts/score_demo.py runs/demo --fixed shape=heart colour=yellow pattern=dotted

Counts the tiles of the last `validation/step-*/<token>.png` that show every attribute the concept fixes, then
samples the same prompts, seeds and sampler with the initializer word in place of the token and counts those: the
demo's result, measured rather than only pictured.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tix.toyworld import scorer, world  # noqa: E402


def tiles(grid: np.ndarray, columns: int, rows: int) -> np.ndarray:
    """A validation grid (train.report.grid) back into its [rows * columns, h, w, 3] tiles, row by row."""
    h, w = grid.shape[0] // rows, grid.shape[1] // columns
    return grid[: rows * h, : columns * w].reshape(rows, h, columns, w, 3).transpose(0, 2, 1, 3, 4).reshape(-1, h, w, 3)


def count(images: np.ndarray, concept: world.Concept) -> int:
    return sum(scorer.matches(s, concept.expected()) for s in scorer.score(images))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path)
    p.add_argument("--fixed", nargs="+", required=True, metavar="ATTRIBUTE=VALUE",
                   help="what the concept fixes, e.g. shape=heart colour=yellow pattern=dotted")
    args = p.parse_args(argv)
    from train.config import load_config
    from train.invert import validation_prompts

    concept = world.Concept("demo", dict(item.split("=", 1) for item in args.fixed))
    cfg = load_config(args.run / "config.yaml", {})
    prompts = validation_prompts(cfg, cfg.style)
    steps = sorted((args.run / "validation").glob("step-*"))
    if not steps:
        raise SystemExit(f"{args.run}/validation has no grids: was the run made with validate_every > 0?")
    from tix.embedding_files import safe_stem

    grid_path = steps[-1] / f"{safe_stem(cfg.token)}.png"
    grid = np.asarray(Image.open(grid_path).convert("RGB"))
    learned = tiles(grid, len(prompts), cfg.validation_seeds)
    n = len(learned)

    import tix

    sd = tix.load(cfg.model)
    init = cfg.init or concept.initializer
    batch = [t.format(init) for _ in range(cfg.validation_seeds) for t in prompts]
    baseline = sd.generate(batch, steps=cfg.validation_steps, guidance=cfg.validation_guidance,
                           sampler=cfg.validation_sampler, seed=cfg.seed, size=learned.shape[1])
    print(f"{grid_path}: the concept ({', '.join(args.fixed)}) drawn in {count(learned, concept)} of {n} tiles; "
          f"the init word {init!r} alone: {count(baseline, concept)} of {n}")


if __name__ == "__main__":
    main()
