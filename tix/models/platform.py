"""Which kind of device the model is being traced for: the choice between the CPU's, GPU's and TPU's forms of
attention and convolution is made at trace time, and a step compiled on this host for a TPU slice that is not here
must get the TPU's forms, not this host's."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import jax

_target: contextvars.ContextVar[str | None] = contextvars.ContextVar("tix_target_platform", default=None)


def backend() -> str:
    """"cpu", "gpu" or "tpu": the platform set by `compiling_for`, else JAX's default backend."""
    return _target.get() or jax.default_backend()


@contextlib.contextmanager
def compiling_for(platform: str) -> Iterator[None]:
    token = _target.set(platform)
    try:
        yield
    finally:
        _target.reset(token)
