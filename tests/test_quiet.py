"""`tix` commands print no transformers banner about PyTorch: tix needs only transformers' tokenizer, which works
without torch. The test environment has torch (the oracles), so the commands run with torch made unimportable, as on
a user's machine that installed tix alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.xla_flags import with_devices

ROOT = Path(__file__).resolve().parents[1]
# Run the CLI as if torch were not installed: a None entry in sys.modules makes find_spec and import fail.
WITHOUT_TORCH = "import sys; sys.modules['torch'] = None; from tix.cli import main; sys.argv[0] = 'tix'; main()"
BANNER = "PyTorch was not found"


def _tix(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRANSFORMERS_", "XLA_FLAGS"))}
    env.update(PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", XLA_FLAGS=with_devices())
    return subprocess.run([sys.executable, "-c", WITHOUT_TORCH, *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def test_transformers_would_print_the_banner_without_torch(tmp_path):
    """The condition the other test relies on: without tix's filter, importing the tokenizer prints the banner."""
    code = "import sys; sys.modules['torch'] = None; from transformers import CLIPTokenizer"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={k: v for k, v in os.environ.items() if not k.startswith("TRANSFORMERS_")})
    assert BANNER in run.stderr + run.stdout


def test_no_pytorch_banner_on_tix_commands(tmp_path):
    help_ = _tix("--help", cwd=tmp_path)
    assert help_.returncode == 0 and "generate" in help_.stdout
    generate = _tix("generate", "--prompt", "a red circle", "--n", "1", "--steps", "1", "--out", str(tmp_path / "o"),
                    cwd=tmp_path)
    assert generate.returncode == 0, generate.stderr[-3000:]
    assert "wrote 1 images" in generate.stdout
    for run in (help_, generate):
        assert BANNER not in run.stdout + run.stderr, run.stderr[-2000:]
        assert "[transformers]" not in run.stderr, run.stderr[-2000:]
