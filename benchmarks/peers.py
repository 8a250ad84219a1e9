"""tix against the two diffusers textual-inversion examples, as whole processes on this machine (prints figures).

    python benchmarks/peers.py --examples DIFFUSERS/examples/textual_inversion --model MODELS/small \\
        --images MODELS/images --resolution 64 --steps 50 250 --repeats 2 --peers-python /work/venvs/peers/bin/python

Each program runs N1 and N2 steps (batch 1 unless --batch) as separate processes; seconds per step are marginal,
(T(N2) - T(N1)) / (N2 - N1), so start-up and compilation cancel, and start-up is T(N1) - N1 x that. Runs alternate
between the programs (tix, PyTorch, Flax, tix, ...) so a change in the machine's load hits all of them alike; the
median of `--repeats` runs is used. The examples are `textual_inversion.py` and `textual_inversion_flax.py` as
diffusers ships them, with only the edits shared/reference/peers.md lists; `benchmarks/peer_models.py` writes the
models (MODEL for tix and PyTorch, MODEL-flax for Flax) and the images. Nothing of the examples enters this repository.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.processes import metrics_rows, timed, tix_invert  # noqa: E402


def commands(args: argparse.Namespace, steps: int, out: Path) -> dict[str, tuple[list[str], dict[str, str]]]:
    """Each program's command line and extra environment for a run of `steps` steps writing under `out`."""
    common = ["--train_data_dir", str(args.images), "--placeholder_token", "<peer>", "--initializer_token", "cat",
              "--resolution", str(args.resolution), "--train_batch_size", str(args.batch),
              "--max_train_steps", str(steps)]
    examples = Path(args.examples).resolve()  # each program runs in its log's folder
    tix = tix_invert("--model", str(args.model), "--images", str(args.images), "--token", "<peer>", "--init", "cat",
                     "--resolution", str(args.resolution), "--batch-size", str(args.batch), "--steps", str(steps),
                     "--out", str(out / "tix"), "--validate-every", "0", "--save-every", "100000",
                     "--set", "log_every=100000", *args.tix_args)
    torch = [args.peers_python, str(examples / "textual_inversion.py"), "--pretrained_model_name_or_path",
             str(args.model), *common, "--output_dir", str(out / "torch"), "--dataloader_num_workers", "0",
             *args.peer_args]
    flax = [args.peers_python, str(examples / "textual_inversion_flax.py"), "--pretrained_model_name_or_path",
            str(args.flax_model or f"{args.model}-flax"), *common, "--output_dir", str(out / "flax"), *args.peer_args]
    stub = {"PYTHONPATH": str(args.stub)} if args.stub else {}
    programs = {"tix": tix, "pytorch": (torch, stub), "flax": (flax, stub)}
    return {name: programs[name] for name in args.programs}


def time_startup(args: argparse.Namespace, logs: Path, warm_runs: int = 2) -> None:
    """Seconds from process start to the end of the first step (its line in metrics.jsonl) of a 1-step `tix invert`,
    and of the whole process (which adds the exports and the report), with an empty compilation cache, then with
    the cache it left."""
    with tempfile.TemporaryDirectory(prefix="tix-peers-cache-") as cache:
        for i in range(1 + warm_runs):
            with tempfile.TemporaryDirectory(prefix="tix-peers-out-") as out:
                command, env = commands(args, 1, Path(out))["tix"]
                started = time.time()
                seconds = timed([*command, "--set", f"compile_cache={cache}", "--set", "log_every=1"], env,
                                logs / f"startup-{i}.log")
                first = metrics_rows(Path(out) / "tix")[0]["time"]
            print(f"tix start-up, {'cold' if i == 0 else 'warm'} cache: first step done at {first - started:.1f} s, "
                  f"whole 1-step process {seconds:.1f} s", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", required=True, help="a diffusers checkout's examples/textual_inversion folder")
    p.add_argument("--model", required=True, help="diffusers folder (tix and the PyTorch example)")
    p.add_argument("--flax-model", help="its Flax copy (default: MODEL-flax)")
    p.add_argument("--images", required=True, help="training images")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch", type=int, default=1, help="images per step, for every program")
    p.add_argument("--steps", type=int, nargs=2, default=[50, 250], metavar=("N1", "N2"))
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--peers-python", default=sys.executable, help="python with diffusers 0.39, transformers 4.57")
    p.add_argument("--stub", help="folder put on the examples' PYTHONPATH (a torchvision stand-in: both import it "
                   "only for a horizontal flip)")
    p.add_argument("--programs", nargs="+", default=["tix", "pytorch", "flax"], choices=["tix", "pytorch", "flax"])
    p.add_argument("--peer-args", type=shlex.split, default=[],
                   help="extra arguments for both examples, as one string: --peer-args='--mixed_precision bf16'")
    p.add_argument("--tix-args", nargs=argparse.REMAINDER, default=[], help="extra `tix invert` arguments (last)")
    p.add_argument("--startup", action="store_true", help="also time tix's start-up with a cold and a warm cache")
    p.add_argument("--logs", type=Path, help="keep each run's output here (default: a temporary folder)")
    args = p.parse_args()
    n1, n2 = args.steps
    logs = args.logs or Path(tempfile.mkdtemp(prefix="tix-peers-"))
    logs.mkdir(parents=True, exist_ok=True)
    times: dict[tuple[str, int], list[float]] = {}
    print(f"load average before: {os.getloadavg()}", flush=True)
    if args.startup:
        time_startup(args, logs)
    if "tix" in args.programs:
        # tix keeps its compiled step, so the first run would pay a compile the later ones do not; every timed run
        # starts warm, as a user's second run does, and start-up stays the same in all of them, as the marginal
        # method needs. (Under a constant learning rate the step count is not part of the step; a run of each
        # length keeps this right for a cosine schedule too.)
        for n in (n1, n2):
            with tempfile.TemporaryDirectory(prefix="tix-peers-out-") as out:
                command, env = commands(args, n, Path(out))["tix"]
                timed(command, env, logs / f"tix-{n}-warmup.log")
    for r in range(args.repeats):
        for n in (n1, n2):
            with tempfile.TemporaryDirectory(prefix="tix-peers-out-") as out:
                for name, (command, env) in commands(args, n, Path(out)).items():
                    seconds = timed(command, env, logs / f"{name}-{n}-{r}.log")
                    times.setdefault((name, n), []).append(seconds)
                    print(f"{name:8s} {n:5d} steps: {seconds:7.1f} s", flush=True)
    print(f"load average after: {os.getloadavg()}")
    per_step, startup = {}, {}
    for name in args.programs:
        t1, t2 = statistics.median(times[name, n1]), statistics.median(times[name, n2])
        per_step[name] = (t2 - t1) / (n2 - n1)
        startup[name] = t1 - n1 * per_step[name]
    print(f"\nresolution {args.resolution}, batch {args.batch}, marginal over {n1}->{n2} steps, "
          f"median of {args.repeats}")
    print("| program | s/step | start-up s |\n| --- | --- | --- |")
    for name in args.programs:
        print(f"| {name} | {per_step[name]:.4f} | {startup[name]:.1f} |")
    if "tix" in per_step:
        peers = [n for n in per_step if n != "tix"]
        for name in peers:
            print(f"tix vs {name}: {per_step[name] / per_step['tix']:.2f}x")
        if peers:
            fastest = min(peers, key=per_step.get)
            print(f"tix vs the faster peer ({fastest}): {per_step[fastest] / per_step['tix']:.2f}x")


if __name__ == "__main__":
    main()
