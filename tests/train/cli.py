"""Running `mom-train` in a subprocess as a user would (the worktree's package, the test's environment)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from tests.train.conftest import ROOT, TINY_MQAR

# a constant learning rate: the schedule does not depend on training.steps, so runs of different lengths agree
CONSTANT_LR = ["training.warmup_steps=0", "training.min_lr_ratio=1.0"]


def env() -> dict[str, str]:
    """The test's environment with this checkout first on the path (also for a package installed elsewhere)."""
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "mom_train", *args]


def mqar_args(run_dir: Path, *overrides: str) -> list[str]:
    """`train` arguments of the tests' tiny MQAR run."""
    return ["train", "--config", str(ROOT / "configs" / "quickstart.yaml"), f"run.dir={run_dir}", *TINY_MQAR,
            *CONSTANT_LR, *overrides]


def run(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """`mom-train ARGS` to completion; stdout and stderr as text."""
    return subprocess.run(command(*args), env=env(), capture_output=True, text=True, timeout=300, **kwargs)


def start(*args: str, **kwargs) -> subprocess.Popen:
    """`mom-train ARGS` in the background; stdout and stderr piped as text unless given."""
    kwargs = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **kwargs}
    return subprocess.Popen(command(*args), env=env(), text=True, **kwargs)


def assert_clean_failure(out: subprocess.CompletedProcess | tuple[int, str], code: int, *phrases: str) -> str:
    """The run failed with `code`, no traceback, at most two lines from the error boundary naming `phrases`."""
    rc, stderr = (out.returncode, out.stderr) if isinstance(out, subprocess.CompletedProcess) else out
    assert rc == code, f"exit code {rc}, expected {code}; stderr:\n{stderr}"
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("mom-train:")]
    assert len(lines) == 1, stderr
    message = stderr[stderr.index(lines[0]):]
    assert len(message.strip().splitlines()) <= 2, message
    for phrase in phrases:
        assert phrase in message, f"{phrase!r} not in {message!r}"
    return message


def wait_for(predicate, timeout_s: float = 120.0, poll_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(poll_s)
