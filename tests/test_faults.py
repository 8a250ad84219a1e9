"""Fault injection: a run killed or stopped anywhere (SIGTERM or SIGKILL at seeded random steps, inside a checkpoint
save, inside the export; after the SIGKILL, its latest checkpoint damaged too) and then resumed with the same command
plus --resume ends bitwise equal to the run that was never interrupted, with every export complete.

Each run is a real `tix invert` process (tests/fault_worker.py sends the signal from inside it at the chosen point);
the processes share a JAX compilation cache, so only the first compiles the step."""

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.test_train import make_concept
from tix.embedding_files import read
from tix.library import Library

ROOT = Path(__file__).resolve().parent.parent
STEPS, SAVE_EVERY = 10, 3
_rng = random.Random(12)  # the "random" steps, fixed so that a failure reproduces
FAULTS = [f"sigterm@{_rng.randrange(1, STEPS)}", f"sigkill@{_rng.randrange(SAVE_EVERY + 1, STEPS)}",
          f"sigkill-save@{2 * SAVE_EVERY}", "sigkill-export"]


def _tix(fault: str, args: list[str], cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(cache),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    return subprocess.run([sys.executable, "-m", "tests.fault_worker", fault, *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)


def _args(model, images, out) -> list[str]:
    return ["invert", "--model", str(model), "--images", str(images), "--token", "<thing>", "--init", "cat",
            "--out", str(out), "--steps", str(STEPS), "--batch-size", "2", "--save-every", str(SAVE_EVERY),
            "--validate-every", "0", "--seed", "5", "--set", "log_every=1"]


def _outputs(run_dir: Path) -> dict[str, np.ndarray]:
    """The learned vectors as each export holds them: the embedding file and the run's token library."""
    (entry,) = Library(run_dir / "tokens").entries()
    return {"file": read(run_dir / "learned_embeds.safetensors")[0].vectors["text_encoder"],
            "library": entry.concept.vectors["text_encoder"]}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_dirs):
    root = tmp_path_factory.mktemp("faults")
    images = make_concept(root / "thing", 0, n=3)
    cache = root / "jax-cache"
    done = _tix("none", _args(tiny_dirs("sd1"), images, root / "ref"), cache)
    assert done.returncode == 0, done.stdout + done.stderr
    return tiny_dirs("sd1"), images, cache, _outputs(root / "ref")


@pytest.mark.parametrize("fault", FAULTS)
def test_a_fault_then_resume_equals_the_uninterrupted_run(tmp_path, setup, fault):
    model, images, cache, reference = setup
    args = _args(model, images, tmp_path / "run")
    cut = _tix(fault, args, cache)
    checkpoints = tmp_path / "run" / "checkpoints" / "wave-000"
    saved = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
    if fault.startswith("sigterm"):
        step = int(fault.split("@")[1])
        assert cut.returncode == 75, cut.stdout + cut.stderr
        assert f"stopped by SIGTERM: saved step {step}" in cut.stderr and "--resume" in cut.stderr
        assert saved[-1] == step  # the step the signal arrived at, not only the last periodic save
    else:
        assert cut.returncode == -signal.SIGKILL, cut.stdout + cut.stderr
    if fault.startswith("sigkill-save"):
        assert int(fault.split("@")[1]) not in saved  # killed before orbax committed it: the one before stands
    assert not (tmp_path / "run" / "learned_embeds.safetensors").exists()
    damaged = None
    if fault.startswith("sigkill@"):  # and then a file of the latest checkpoint is lost: resume from the one before
        damaged = checkpoints / str(saved[-1])
        (damaged / "state" / "manifest.ocdbt").unlink()

    resumed = _tix("none", [*args, "--resume"], cache)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    if damaged is not None:
        assert f"checkpoint {damaged} is damaged" in resumed.stderr
        assert (checkpoints / f"{damaged.name}.damaged").is_dir()
    got = _outputs(tmp_path / "run")
    for name, want in reference.items():
        np.testing.assert_array_equal(got[name], want, err_msg=name)
    assert (tmp_path / "run" / "report.html").exists() and (tmp_path / "run" / "loss.png").exists()
