"""The train-step benchmark's XLA option variants (benchmarks/train_step.py --xla): XLA refuses a bool or a number
given as text, so each value must reach it with its type, and a malformed variant must stop before a compile."""

from __future__ import annotations

import pytest

from benchmarks.train_step import _options as options


def test_xla_variants_reach_the_compiler_typed():
    assert options("default") == {}
    parsed = options("xla_gpu_enable_triton_gemm=false,xla_gpu_autotune_level=0,xla_dump_to=/tmp/x,flag=TRUE")
    assert parsed == {"xla_gpu_enable_triton_gemm": False, "xla_gpu_autotune_level": 0, "xla_dump_to": "/tmp/x",
                      "flag": True}
    assert type(parsed["xla_gpu_autotune_level"]) is int and parsed["xla_gpu_enable_triton_gemm"] is False
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        options("xla_gpu_enable_triton_gemm")
