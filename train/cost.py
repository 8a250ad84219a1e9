"""What XLA says a compiled step costs: FLOPs and bytes per device. Shared by `tix invert` (printed before the first
step, and the fit check) and `benchmarks/train_step.py` (fraction of peak)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from tix.models import platform


def flops(lowered: Any) -> float:
    """FLOPs of one call, counted on the lowered (pre-optimisation) HLO.

    Why not the compiled executable's count: on GPU XLA turns convolutions into cuDNN custom calls, which its cost
    analysis then skips, so the compiled count for a UNet step is a fraction of the real work. The lowered HLO has
    every convolution and dot, but in the form traced for its backend: a GPU's fused attention is a custom call
    (not counted), and the CPU's blocked attention a loop whose body XLA counts once; `plain_flops` counts the form
    every backend shares. Under remat it includes the recomputed forward.
    """
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float((cost or {}).get("flops", float("nan")))


def plain_flops(fn: Callable[..., Any], *args: Any) -> float:
    """FLOPs of `fn(*args)` lowered in its plain form, the one traced for a TPU (plain attention: no custom calls,
    no loops over blocks), on any host: the whole step's work (SD 1.5 at 512 px: 1669 GFLOP per image, where the
    CPU's own form read 1355). `fn` un-jitted: it is traced afresh here, since JAX's trace cache does not know the
    platform the trace was made for and would hand back a jitted function's earlier form."""
    with platform.compiling_for("tpu"):
        return flops(jax.jit(lambda *a: fn(*a)).lower(*args))


def device_bytes(compiled: Any) -> int:
    """Bytes one device holds while the step runs: arguments, outputs, temporaries and code, with donated buffers
    (counted as both arguments and outputs) counted once."""
    mem = compiled.memory_analysis()
    if mem is None:
        return 0
    total = sum(getattr(mem, a, 0) or 0 for a in ("argument_size_in_bytes", "output_size_in_bytes",
                                                 "temp_size_in_bytes", "generated_code_size_in_bytes"))
    return total - (getattr(mem, "alias_size_in_bytes", 0) or 0)
