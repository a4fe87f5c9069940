"""Faults during training (the data vanishing, a full disk, I/O errors): save the last good state, say so, stop.

The loop marks its last consistent state with `Rescue.mark` (the step count and how to snapshot the data
loader and RNG at that point). When a fault (`FAULTS`) escapes the loop, `Rescue.fault` saves that state as a
checkpoint when it can (one process; the fault was not the save itself) and returns a `TrainingFault` naming
the cause, the checkpoint to resume from and the fix. With several ranks the peers of a failing rank wait in
a collective, so no rescue is attempted there: the run resumes from its last periodic checkpoint.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mom_train.checkpoint import candidate_checkpoints
from mom_train.parallel.dims import ParallelDims
from mom_train.errors import DataError, TrainingFault, UserError, describe_os_error

# what stops training as a fault rather than a bug
FAULTS = (OSError, DataError)


def fetch_batches(loader: Iterator, count: int) -> list:
    """The next `count` micro-batches; a read failure of the data stream becomes a DataError naming it."""
    try:
        return [next(loader) for _ in range(count)]
    except OSError as e:
        raise DataError(f"reading the training data failed: {describe_os_error(e)}") from e


def describe_fault(e: BaseException) -> str:
    return describe_os_error(e) if isinstance(e, OSError) else str(e)


class Rescue:
    """The loop's last consistent state, and saving it when a fault stops training."""

    def __init__(self, dims: ParallelDims, run_dir: Path):
        self.dims = dims
        self.run_dir = run_dir
        self.step: int | None = None
        self.first_step: int | None = None
        self.snapshot: Callable[[], tuple[dict, dict]] | None = None
        self.save: Callable[[int, dict, dict], Any] | None = None
        # set while a checkpoint is written: a fault there is not retried
        self.saving = False
        self.closers: list[Callable[[], None]] = []

    def mark(self, step: int, snapshot: Callable[[], tuple[dict, dict]]) -> None:
        """Parameters and optimizer now hold the state after `step` steps; `snapshot()` gives the matching
        (data loader state, RNG state)."""
        self.step, self.snapshot = step, snapshot
        if self.first_step is None:
            self.first_step = step

    def fault(self, e: BaseException) -> UserError:
        """Save the marked state if possible and return the error to raise, naming cause, checkpoint and fix."""
        try:
            return self._outcome(e, describe_fault(e))
        finally:
            for close in self.closers:
                try:
                    close()
                except Exception:  # noqa: BLE001 - closing is best effort after a fault
                    pass

    def _outcome(self, e: BaseException, cause: str) -> UserError:
        if self.saving:
            cause = f"writing checkpoint step {self.step} failed: {cause}"
        if self.step is None or self.step == self.first_step:
            # this process trained no step: nothing new to save, a failure to fix before rerunning
            return e if isinstance(e, UserError) else TrainingFault(f"{cause}; fix that and rerun", resumable=False)
        saved = None
        if self.save is not None and self.snapshot is not None and not self.saving and not self.dims.distributed:
            try:
                self.save(self.step, *self.snapshot())
                saved = f"saved the last good state as checkpoint step {self.step} in {self.run_dir}"
            except FAULTS as again:
                cause += f"; saving the last good state failed as well ({describe_fault(again)})"
        if saved is None:
            found = candidate_checkpoints(self.run_dir)
            if not found:
                return TrainingFault(f"after step {self.step}: {cause}. No checkpoint was saved "
                                     "yet; fix that and rerun to start again", resumable=False)
            saved = f"the last good checkpoint is {found[0]}"
        return TrainingFault(f"after step {self.step}: {cause}.\n  {saved}; rerun the same "
                             "command to resume from it once that is fixed")
