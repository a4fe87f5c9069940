"""Failures a user can act on, and the words the command line reports them with.

Every expected failure is a `UserError` (or a `ConfigError`, or an `OSError` that `describe_os_error` names);
its message says what went wrong and how to fix it. `mom-train` prints it on one or two lines, without a
traceback unless `--debug` is given, and exits with the error's `exit_code`: 2 for a problem to fix before
running again, 3 for a fault during training after which the last good state is on disk to resume from.
"""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path


class UserError(Exception):
    """A failure with a known cause and fix; `label` prefixes the CLI's message."""
    exit_code = 2
    label = "error"


class CheckpointError(UserError):
    """A checkpoint is missing, unreadable or does not fit this run."""
    label = "checkpoint error"


class InputError(UserError):
    """A bad command-line argument (a prompt, a token count)."""
    label = "bad input"


class DataError(UserError):
    """The training or evaluation data cannot be read or reached."""
    label = "data error"


class RunDirError(UserError):
    """The run directory cannot be used: not writable, a file, or in use by another training."""
    label = "run dir error"


class TrainingFault(UserError):
    """Training stopped on a fault; `exit_code` 3 when a checkpoint to resume from is on disk, else 2."""
    label = "stopped"

    def __init__(self, message: str, resumable: bool = True):
        super().__init__(message)
        self.exit_code = 3 if resumable else 2


def _free_space(path: str | os.PathLike | None) -> str:
    """Free space of the disk holding `path` (or its nearest existing parent), as text; "" if unknown."""
    if not path:
        return ""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        free = shutil.disk_usage(p).free
    except OSError:
        return ""
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if free >= size:
            return f"{free / size:.1f} {unit} free there"
    return f"{free} bytes free there"


def describe_os_error(e: OSError) -> str:
    """One line naming the cause (with the path) and the fix."""
    path = e.filename or ""
    where = f" {path}" if path else ""
    code = e.errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        free = _free_space(path)
        return f"disk full writing{where}{f' ({free})' if free else ''}; free space, or set run.dir to a disk with room"
    if code == errno.EFBIG:
        return f"file size limit reached writing{where} (see `ulimit -f`); raise the limit or free space, then rerun"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (f"permission denied on{where} (read-only or owned by someone else); make it writable or set run.dir "
                "to a writable directory")
    if code == errno.ENOENT:
        return f"no such file or directory:{where}; check the path"
    if code in (errno.ENOTDIR, errno.EEXIST):
        return f"{path or 'a path'} is in the way (a file where a directory is needed); move it or choose another path"
    if code == errno.EISDIR:
        return f"{path} is a directory where a file is expected; check the path"
    reason = e.strerror or str(e)
    return f"{reason}{f' ({path})' if path else ''}; check the disk or file system, then rerun"


def write_error(e: RuntimeError, path: Path) -> OSError:
    """The OSError behind a failed torch.save: torch reports a short write as "unexpected pos". It is called a
    full disk when under 64 MiB are left, else a cut write (quota, file size limit or a full disk)."""
    p = path.parent
    try:
        free = shutil.disk_usage(p).free if p.exists() else None
    except OSError:
        free = None
    if free is not None and free < 64 * 2 ** 20:
        return OSError(errno.ENOSPC, "No space left on device", str(path))
    cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return OSError(errno.EIO, f"the write was cut short ({cause}): disk full, quota or file size limit", str(path))
