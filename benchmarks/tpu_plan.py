"""Compile tix's train step for TPU slices from this machine and print memory per chip and FLOPs per image
(prints a table; needs libtpu, not a TPU, and no weights: every argument is a shape).

    python benchmarks/tpu_plan.py --target v5litepod-8 v4-8 v6e-8 --model sd15 sdxl --batch 1 4 8 [--remat both]

One concept per chip, `batch` images of it per chip per step, weights and compute in bfloat16, the real SD 1.5 and
SDXL shapes at their native resolutions (512 and 1024 px) unless --resolution says otherwise. The step is compiled by
`train.compile_plan.plan`, the function `tix invert --compile-only --target` uses. Without libtpu it stops with
tix's error naming the package to install; a compile that fails (out of memory at compile time) is a row too.
The README's TPU table comes from this script.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    import dataclasses

    from benchmarks.train_step import random_sd
    from tix import parallel
    from tix.errors import TixError
    from train import compile_plan
    from train.step import StepConfig, make_optimizer

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", nargs="+", default=["v5litepod-8", "v4-8", "v6e-8"])
    p.add_argument("--model", nargs="+", default=["sd15", "sdxl"], choices=["tiny", "sd15", "sdxl"])
    p.add_argument("--batch", nargs="+", type=int, default=[8])
    p.add_argument("--remat", choices=["on", "off", "both"], default="both")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--resolution", type=int)
    p.add_argument("--images", type=int, default=4, help="images per concept (the latent table's size)")
    args = p.parse_args()
    remats = {"on": [True], "off": [False], "both": [False, True]}[args.remat]
    try:  # every slice name and libtpu itself checked before the first (long) compile
        slices = {t: compile_plan.tpu_slice(t) for t in args.target}
        meshes = {t: parallel.make_mesh(compile_plan.target_devices(s)) for t, s in slices.items()}
    except TixError as err:
        sys.exit(f"tpu_plan.py: error: {err}")
    compile_plan.enable_cache(None)  # a second run of the table loads the compiled steps
    print("| target | model | px | remat | batch/chip | GB/chip (of) | fits | GFLOP/image | compile s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |", flush=True)
    for target in args.target:
        tpu, mesh = slices[target], meshes[target]
        for model in args.model:
            base = random_sd(model, args.dtype, abstract=True)
            resolution = args.resolution or base.default_size
            for remat in remats:
                sd = dataclasses.replace(base, unet=base.unet.clone(remat=True)) if remat else base
                for batch in args.batch:
                    shapes = compile_plan.Shapes(slots=mesh.devices.size, sharded_tables=True, n_max=1,
                                                 images=args.images, prompts=27, views=2)
                    step_cfg = StepConfig(batch, 1, 0.5, None, None, resolution)
                    try:
                        plan = compile_plan.plan(sd, step_cfg, make_optimizer(1e-3, 1000), shapes, mesh,
                                                 tpu.bytes_per_chip)
                    except Exception as err:  # a compile that fails is a row of the table too
                        print(f"| {target} | {model} | {resolution} | {'yes' if remat else 'no'} | {batch} | failed: "
                              f"{str(err).splitlines()[0][:120]} | | | |", flush=True)
                        continue
                    print(f"| {target} | {model} | {resolution} | {'yes' if remat else 'no'} | {batch} | "
                          f"{plan.bytes_per_device / 1e9:.2f} ({tpu.bytes_per_chip / 1e9:.1f}) | "
                          f"{'yes' if plan.fits else 'NO'} | {plan.flops_per_image / 1e9:.4g} | "
                          f"{plan.compile_seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
