"""What XLA says a compiled step costs: FLOPs and bytes per device. Shared by `tix invert` (printed before the first
step, and the fit check) and `benchmarks/train_step.py` (fraction of peak)."""

from __future__ import annotations

from typing import Any


def flops(lowered: Any) -> float:
    """FLOPs of one call, counted on the lowered (pre-optimisation) HLO.

    Why not the compiled executable's count: on GPU XLA turns convolutions into cuDNN custom calls, which its cost
    analysis then skips, so the compiled count for a UNet step is a fraction of the real work. The lowered HLO still
    has every convolution and dot, the same on every backend. Under remat it includes the recomputed forward.
    """
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float((cost or {}).get("flops", float("nan")))


def device_bytes(compiled: Any) -> int:
    """Bytes one device holds while the step runs: arguments, outputs, temporaries and code, with donated buffers
    (counted as both arguments and outputs) counted once."""
    mem = compiled.memory_analysis()
    if mem is None:
        return 0
    total = sum(getattr(mem, a, 0) or 0 for a in ("argument_size_in_bytes", "output_size_in_bytes",
                                                 "temp_size_in_bytes", "generated_code_size_in_bytes"))
    return total - (getattr(mem, "alias_size_in_bytes", 0) or 0)
