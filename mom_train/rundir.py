"""The run directory: created and checked before anything is written into it, and held by one training at a time.

`hold_run_dir` makes `<run.dir>/<run.name>/` (a `RunDirError` naming the fix when it is a file or cannot be
written) and takes an exclusive lock on its `.lock` file: `fcntl.flock`, which the kernel releases when the
holder exits in any way, kill -9 included. The holder writes its pid, host and start time into the file, so a
second training on the same run dir stops at once naming the first, and a lock file left behind by a process
that died is taken over with a note. Rank 0 holds the lock; the other ranks learn the outcome from it.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from mom_train.parallel.dims import ParallelDims
from mom_train.errors import RunDirError, describe_os_error

LOCK_FILE = ".lock"


def prepare_run_dir(path: Path) -> None:
    """Create the run dir and check that it is a writable directory; RunDirError naming the fix otherwise."""
    if path.exists() and not path.is_dir():
        raise RunDirError(f"the run dir {path} is a file, not a directory; move the file away, or choose another "
                          "run.name or run.dir")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"cannot create the run dir {path}: {describe_os_error(e)}") from None
    probe = path / f".write_test.{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise RunDirError(f"cannot write into the run dir {path}: {describe_os_error(e)}") from None


class RunDirLock:
    """An exclusive lock on `<run dir>/.lock`; `acquire` raises RunDirError while another process holds it."""

    def __init__(self, run_dir: Path, note: Callable[[str], None]):
        self.path = run_dir / LOCK_FILE
        self.note = note
        self.file = None

    def acquire(self) -> None:
        # a holder that releases deletes the file: retry when the file locked is no longer the one at the path
        while True:
            f = open(self.path, "a+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "another process"
                f.close()
                raise RunDirError(f"the run dir {self.path.parent} is in use by another training ({holder}); wait "
                                  "for it to finish or stop it, or choose another run.name") from None
            if self.path.exists() and os.stat(self.path).st_ino == os.fstat(f.fileno()).st_ino:
                break
            f.close()
        f.seek(0)
        previous = f.read().strip()
        if previous:
            self.note(f"note: took over the lock of a training that is no longer running ({previous})")
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        self.file = f

    def release(self) -> None:
        if self.file is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        self.file.close()
        self.file = None


@contextlib.contextmanager
def hold_run_dir(run_dir: Path, dims: ParallelDims, note: Callable[[str], None]) -> Iterator[None]:
    """Prepare and lock the run dir on rank 0 for the duration of the block; every rank raises if it failed."""
    lock = RunDirLock(run_dir, note)
    error: RunDirError | None = None
    if dims.is_main:
        try:
            prepare_run_dir(run_dir)
            lock.acquire()
        except RunDirError as e:
            error = e
    if dims.max_int(int(error is not None)):
        raise error or RunDirError(f"rank 0 could not take the run dir {run_dir}; see its message")
    try:
        yield
    finally:
        lock.release()
