"""The allocator setting the tix command makes: freed memory is reused already mapped, not faulted in again."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Page faults over 20 rounds of allocating, touching and freeing 64 MB, after one round to warm up.
_PROBE = """
import resource, sys
import numpy as np
from tix import host_memory
print(host_memory.keep_freed_memory() if sys.argv[1] == "keep" else None)
np.ones(2**24, np.float32)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    np.ones(2**24, np.float32)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str, **env: str) -> tuple[str, int]:
    done = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env})
    kept, faults = done.stdout.split()
    return kept, int(faults)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's; elsewhere it is a no-op")
def test_freed_memory_is_reused_without_page_faults():
    _, default = _faults("default")
    kept, faults = _faults("keep")
    assert kept == "True"
    assert default > 1000  # glibc's default unmaps each 64 MB block on free, so every round faults it in again
    assert faults < default / 20


def test_the_opt_out_keeps_the_default_allocator():
    kept, _ = _faults("keep", TIX_RETURN_FREED_MEMORY="1")
    assert kept == "False"
