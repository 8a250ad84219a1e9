"""Run checkpoints on orbax: the learned vectors, optimizer state and step (every random draw and the data order are
functions of the seeds and the step, so they need no state of their own). Orbax writes into a temporary folder and
renames it when complete, so a run killed mid-save keeps its previous checkpoint. On gs:// (no renames) it writes a
commit_success.txt file last and ignores steps without one.

A checkpoint damaged afterwards (a file lost or deleted) is set aside when resuming, with a warning naming it, and
the one before it is used."""

from __future__ import annotations

import logging
from typing import Any

import jax
import orbax.checkpoint as ocp

from tix import fs

log = logging.getLogger("tix")
DAMAGED = ".damaged"  # suffix of a checkpoint folder set aside; orbax ignores folders not named by a step


class Checkpoints:
    """The checkpoints of one wave of a run: `root/step` folders, the last `keep` kept."""

    def __init__(self, root: fs.PathLike, keep: int):
        fs.check_supported(root, checkpoints=True)
        self.root = fs.absolute(root)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.root, options=options)

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        self.manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True
        )
        self.manager.wait_until_finished()

    def restore(self, abstract_state: Any = None, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """The state saved at `step` (default: the latest), shaped like `abstract_state` (None: as saved)."""
        step = self.latest() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.root}")
        abstract = None if abstract_state is None else jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        )
        return restored["state"], restored["meta"]

    def restore_latest(self, abstract_state: Any) -> tuple[Any, dict[str, Any]] | None:
        """The newest checkpoint that restores, shaped like `abstract_state`; None if there is none (or none left). A
        damaged one is renamed `<step>.damaged` (kept for inspection, and so that its step can be saved again), with a
        warning."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                return self.restore(abstract_state, step)
            except Exception as err:  # orbax/tensorstore raise ValueError, FileNotFoundError, KeyError, ... here
                damaged = self.root / str(step)
                log.warning("checkpoint %s is damaged (%s: %s); setting it aside as %s%s and trying the one before",
                            damaged, type(err).__name__, str(err).splitlines()[0][:200], damaged.name, DAMAGED)
                self._set_aside(step)
        return None

    def _set_aside(self, step: int) -> None:
        if jax.process_count() > 1:  # every host tried the same files; one renames them
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"tix: checkpoint {step} failed to restore")
        if jax.process_index() == 0:
            target = self.root / f"{step}{DAMAGED}"
            if target.exists():
                fs.rmtree(target)
            (self.root / str(step)).rename(target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"tix: checkpoint {step} set aside")
        self.manager.reload()

    def close(self) -> None:
        self.manager.close()
