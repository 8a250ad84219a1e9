"""Run checkpoints on orbax: the learned vectors, optimizer state and step (every random draw and the data order are
functions of the seeds and the step, so they need no state of their own). Orbax writes into a temporary folder and
renames it when complete, so a run killed mid-save keeps its previous checkpoint. On gs:// (no renames) it writes a
commit_success.txt file last and ignores steps without one."""

from __future__ import annotations

from typing import Any

import jax
import orbax.checkpoint as ocp

from tix import fs


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

    def close(self) -> None:
        self.manager.close()
