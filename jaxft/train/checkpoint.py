"""Orbax checkpoints of a run: trainable state, optimizer state, step, RNG, data position.

``checkpoints/`` keeps the last N steps; ``best/`` keeps the step with the best validation loss.
Writes are asynchronous and atomic (orbax finalises a step directory only when it is complete),
so a run killed while writing resumes from the previous checkpoint. Only the trainable subtree is
saved for LoRA runs; the base is referenced by path and a fingerprint of its config.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class RunCheckpoints:
    """The checkpoint managers of one run directory."""

    def __init__(self, run_dir: str | Path, keep: int = 2, async_save: bool = True):
        run_dir = Path(run_dir).absolute()
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep,
                                            enable_async_checkpointing=async_save)
        self.latest = ocp.CheckpointManager(run_dir / "checkpoints", options=opts)
        best_opts = ocp.CheckpointManagerOptions(max_to_keep=1,
                                                 enable_async_checkpointing=async_save)
        self.best = ocp.CheckpointManager(run_dir / "best", options=best_opts)

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def save(self, step: int, state: Any, data_state: dict, meta: dict, *,
             best: bool = False) -> None:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=ocp.args.JsonSave(data_state),
                                  meta=ocp.args.JsonSave(meta))
        self.latest.save(step, args=args, force=True)
        if best:
            # One save in flight at a time: two managers finalising concurrently run their
            # cross-process barriers in an order that can differ between processes (a deadlock
            # seen with two jax.distributed processes).
            self.latest.wait_until_finished()
            self.best.save(step, args=args, force=True)
            self.best.wait_until_finished()

    def restore(self, step: int, abstract_state: Any,
                manager: ocp.CheckpointManager | None = None) -> tuple[Any, dict, dict]:
        """``(state, data iterator state, meta)``; the state is placed as ``abstract_state`` says."""
        mgr = manager or self.latest
        out = mgr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))
        return out["state"], out["data"], out["meta"]

    def wait(self) -> None:
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.latest.close()
        self.best.close()


def abstract_with_shardings(state: Any, shardings: Any) -> Any:
    """``jax.ShapeDtypeStruct`` leaves carrying the target shardings, for ``restore``."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        state, shardings)
