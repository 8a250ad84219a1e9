"""XLA flags for the test suite and for the processes its tests start.

The suite compiles hundreds of tiny programs that each run for milliseconds, so compiling is most of its time. Three
flags cut it without changing what is computed: no LLVM optimisation of the CPU code (no fast-math either way), no
expensive LLVM passes, and XLA:CPU's classic loop emitters for fusions instead of its MLIR fusion emitters, which
take about twice as long to compile a UNet. A test process that needs N simulated devices must keep these flags too,
hence `with_devices` rather than a bare `--xla_force_host_platform_device_count`."""

from __future__ import annotations

FAST_COMPILE = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                "--xla_cpu_use_fusion_emitters=false")


def with_devices(n: int | None = None) -> str:
    """XLA_FLAGS for a test process: the fast-compile flags, and `n` simulated host devices when given."""
    return FAST_COMPILE if n is None else f"{FAST_COMPILE} --xla_force_host_platform_device_count={n}"
