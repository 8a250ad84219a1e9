"""`tix generate` end to end on tiny models, and `StableDiffusion.generate` over 8 simulated devices.

The expensive runs (each compiles a whole sampling loop) are separate processes started together by one fixture, so
they overlap; the tests then read their results. Between them every sampler name runs once: ddim (SD1 CLI, with a
negative prompt), euler (SDXL CLI, at a non-native size) and dpm++2m (the device-count comparison).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tix
from tests.xla_flags import with_devices
from tix import cli

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a photo of a red cat"

DEVICES = """
import json, sys
import jax, numpy as np
import tix
from tix import parallel

assert jax.device_count() == 8, jax.devices()
sd = tix.load(sys.argv[1])
colours, things = ["red", "green", "blue", "small"], ["cat", "dog"]
prompts = [f"a photo of a {c} {t}" for c in colours for t in things]
one, eight = parallel.make_mesh(jax.devices()[:1]), parallel.make_mesh(jax.devices())
a = sd.generate(prompts, steps=3, seed=1, mesh=one).astype(int)
b = sd.generate(prompts, steps=3, seed=1, mesh=eight).astype(int)
neg = sd.generate(prompts, steps=3, seed=1, mesh=one, negative="blue background").astype(int)
five = sd.generate(prompts[:5], steps=3, seed=1, mesh=eight).astype(int)  # padded to 8 rows: the same executable
print(json.dumps({
    "shape": list(a.shape), "max_diff": int(np.abs(a - b).max()), "frac_diff": float((a != b).mean()),
    "rows_differ": int(sum(np.abs(a[i] - a[j]).max() > 0 for i in range(8) for j in range(i))),
    "negative_diff": int(np.abs(a - neg).max()), "five_shape": list(five.shape),
    "five_diff": int(np.abs(five - b[:5]).max()),
}))
"""


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "XLA_FLAGS": with_devices(), "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", **extra}


@pytest.fixture(scope="module")
def runs(tiny_dirs, tmp_path_factory):
    """Start the three slow processes at once; `runs(name)` waits for one and returns (returncode, stdout, stderr,
    out_dir)."""
    out = tmp_path_factory.mktemp("generate")
    sd1, sdxl = tiny_dirs("sd1"), tiny_dirs("sdxl")
    generate = [sys.executable, "-m", "tix.cli", "generate", "--prompt", PROMPT, "--n", "2", "--steps", "3"]
    commands = {
        "sd1": ([*generate, "--model", str(sd1), "--sampler", "ddim", "--negative", "blue background",
                 "--out", str(out / "sd1")], _env()),
        "sdxl": ([*generate, "--model", str(sdxl), "--sampler", "euler", "--size", "48", "--seed", "7",
                  "--out", str(out / "sdxl")], _env()),
        "devices": ([sys.executable, "-c", DEVICES, str(sd1)],
                    _env(XLA_FLAGS=with_devices(8))),
    }
    procs = {name: subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, (cmd, env) in commands.items()}
    done = {}

    def result(name: str):
        if name not in done:
            stdout, stderr = procs[name].communicate(timeout=600)
            done[name] = (procs[name].returncode, stdout, stderr, out / name)
        return done[name]

    yield result
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _check_written(out: Path, n: int, size: int, seed: int) -> list[np.ndarray]:
    pngs = sorted(out.glob("*.png"))
    grids = [p for p in pngs if p.name.endswith("-grid.png")]
    singles = [p for p in pngs if p not in grids]
    stem = "a_photo_of_a_red_cat"
    assert [p.name for p in singles] == [f"{stem}-{seed}-{i}.png" for i in range(n)]
    assert [p.name for p in grids] == [f"{stem}-{seed}-grid.png"]
    images = [np.asarray(Image.open(p)) for p in singles]
    for image in images:
        assert image.shape == (size, size, 3) and image.dtype == np.uint8
        assert image.std() > 0  # a picture, not a constant fill
    grid = np.asarray(Image.open(grids[0]))
    assert grid.shape == (size, n * size, 3)  # one row of n (n <= 4 columns)
    for i, image in enumerate(images):
        np.testing.assert_array_equal(grid[:, i * size:(i + 1) * size], image)
    return images


def test_cli_generate_sd1_ddim_with_negative(runs):
    rc, stdout, stderr, out = runs("sd1")
    assert rc == 0, stderr[-3000:]
    assert f"wrote 2 images and a grid to {out}" in stdout
    _check_written(out, n=2, size=32, seed=0)  # the tiny SD1's native size: sample_size 16 x VAE factor 2


def test_cli_generate_sdxl_euler_at_another_size(runs):
    rc, stdout, stderr, out = runs("sdxl")
    assert rc == 0, stderr[-3000:]
    _check_written(out, n=2, size=48, seed=7)


def test_generate_over_8_devices_matches_1_device(runs):
    rc, stdout, stderr, _ = runs("devices")
    assert rc == 0, stderr[-3000:]
    got = json.loads(stdout.strip().splitlines()[-1])
    print(f"8 devices vs 1: max uint8 difference {got['max_diff']}, fraction differing {got['frac_diff']:.2e}")
    assert got["shape"] == [8, 32, 32, 3]
    assert got["max_diff"] <= 1
    assert got["rows_differ"] == 28  # 8 prompts, 8 noise rows: every pair of images differs
    assert got["negative_diff"] > 0
    assert got["five_shape"] == [5, 32, 32, 3] and got["five_diff"] == 0


def test_cli_passes_every_flag_to_generate(tiny_dirs, tmp_path, monkeypatch):
    """The wiring from flags to `StableDiffusion.generate` (the real sampling is covered by the runs above)."""
    seen = {}

    def fake_generate(self, prompts, **kwargs):
        seen.update(kwargs, prompts=list(prompts), kind=self.kind)
        return np.full((len(prompts), 24, 24, 3), 200, np.uint8)

    monkeypatch.setattr(tix.StableDiffusion, "generate", fake_generate)
    cli.main(["generate", "--model", str(tiny_dirs("sd1")), "--prompt", "a/b: c", "--negative", "blurry", "--n", "5",
              "--steps", "7", "--guidance", "3.5", "--sampler", "euler", "--seed", "11", "--size", "24",
              "--out", str(tmp_path)])
    assert seen == {"prompts": ["a/b: c"] * 5, "negative": "blurry", "steps": 7, "guidance": 3.5, "sampler": "euler",
                    "seed": 11, "size": 24, "kind": "sd1"}
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"a_b_c-11-{i}.png" for i in range(5)] + ["a_b_c-11-grid.png"]
    assert Image.open(tmp_path / "a_b_c-11-grid.png").size == (4 * 24, 2 * 24)  # 4 columns, 2 rows


def test_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["generate", "--model", str(tmp_path / "no" / "such" / "model"), "--prompt", "x",
                  "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("tix: error:") and "no such folder" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):
        cli.parser().parse_args(["generate", "--prompt", "x", "--sampler", "plms"])
    assert "invalid choice: 'plms'" in capsys.readouterr().err
