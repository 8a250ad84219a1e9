"""Stopping a run cleanly on a signal: SIGTERM (how Spot and preemptible VMs, Kubernetes and SLURM stop a job) and
SIGINT (Ctrl-C) become a request that the training loop honours between steps, after saving a checkpoint.

On many hosts a signal may reach only some of them, and a host that stopped alone would leave the others waiting in
the next step's all-reduce (and orbax's save is collective). So the hosts combine their requests with a tiny
all-reduce launched after each step and read one step later, when the device has finished that step anyway: every
host learns of a request after the same step and saves that step, at no cost to the pipeline."""

from __future__ import annotations

import signal
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from tix import parallel

# What `tix invert` exits with after saving: 75 is EX_TEMPFAIL ("try again later": re-run with --resume), so a
# supervisor can tell a saved, resumable stop from a failure; Ctrl-C keeps the shell's usual 130.
EXIT_CODES = {signal.SIGTERM: 75, signal.SIGINT: 130}
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(KeyboardInterrupt):
    """Training stopped on a signal after saving its state (a KeyboardInterrupt, so `except Exception` does not
    swallow it). `exit_code` is what the `tix` command exits with."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(signal.Signals(self.signum), 130)


class StopRequests:
    """While active (a context manager), SIGTERM and SIGINT are recorded instead of ending the process; a second
    signal acts as it did before (so a second Ctrl-C leaves at once). `agreed()` is called after every step, on
    every host, and returns the signal all hosts stop on after this step (the highest received), or 0."""

    def __init__(self, mesh: Mesh):
        self.signum = 0
        self._mesh = mesh
        self._pending: jax.Array | None = None
        self._previous: dict[int, Any] = {}
        if jax.process_count() > 1:
            self._sharding = parallel.batch_sharded(mesh)
            self._reduce = jax.jit(jnp.max, out_shardings=parallel.replicated(mesh))

    def __enter__(self) -> StopRequests:
        self._previous = {s: signal.signal(s, self._record) for s in SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        self._restore()

    def _record(self, signum: int, frame: Any) -> None:
        self.signum = max(self.signum, signum)
        self._restore()

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def agreed(self) -> int:
        if jax.process_count() == 1:
            return self.signum
        # Each host contributes its own signal to its own devices' entries; the max is read one call later.
        local = self.signum
        flags = jax.make_array_from_callback((self._mesh.devices.size,), self._sharding,
                                             lambda idx: np.full(len(range(self._mesh.devices.size)[idx[0]]), local,
                                                                 np.int32))
        previous, self._pending = self._pending, self._reduce(flags)
        return 0 if previous is None else int(parallel.to_host(previous))
