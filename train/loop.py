"""The training loop: a compiled step applied up to a target step, with the side work (logging, checkpoints,
validation, stop requests) as hooks that each run every so many steps."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any


@dataclasses.dataclass(frozen=True)
class Hook:
    """`run(step, state, metrics)` after every `every`-th step and after the last one; every=0: never."""

    every: int
    run: Callable[[int, Any, Any], None]

    def due(self, step: int, last: int) -> bool:
        return self.every > 0 and (step % self.every == 0 or step == last)


def run_steps(step_fn: Callable[[Any], tuple[Any, Any]], state: Any, start: int, stop: int, hooks: Sequence[Hook],
              check: Callable[[int, Any], float]) -> tuple[Any, float]:
    """Apply `step_fn(state) -> (state, metrics)` for steps start+1..stop, running the due hooks, in order, after
    each step. Each step's metrics are checked (`check(step, metrics) -> loss`, which raises on a bad loss) one step
    late, so the host never waits for the device; a hook that needs the current step's loss checks it itself.
    Returns the state and the last step's loss (nan if no step ran)."""
    pending = None
    loss = math.nan
    for step in range(start + 1, stop + 1):
        state, metrics = step_fn(state)
        if pending is not None:
            loss = check(*pending)
        pending = (step, metrics)
        for hook in hooks:
            if hook.due(step, stop):
                hook.run(step, state, metrics)
    if pending is not None:
        loss = check(*pending)
    return state, loss
