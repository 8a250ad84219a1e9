"""How fast the toy world's attribute scorer reads images (it scores every benchmark sample).

    python benchmarks/scorer_speed.py [--n 2400] [--size 32]

Prints images per second for held-out renders, after a warm-up call that builds the prototypes for the size.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tix.toyworld import scorer, world  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2400, help="images to score")
    parser.add_argument("--size", type=int, default=32, help="pixels")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    images, _ = world.dataset(args.n, 20_251_126, args.size)
    scorer.score(images[:8])  # prototypes are built once per image size
    best = float("inf")
    for _ in range(args.repeats):
        start = time.perf_counter()
        scorer.score(images)
        best = min(best, time.perf_counter() - start)
    print(f"scorer: {args.n / best:.0f} images/s at {args.size} px (best of {args.repeats}, {args.n} images)")


if __name__ == "__main__":
    main()
