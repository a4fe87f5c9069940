"""Run a test module's kernel checks in a child process under the Triton interpreter.

Triton decides interpreter mode when it is first imported, and pytest may already have imported it, so the
checks run as `python <module>` with TRITON_INTERPRET=1; the child prints its results as one JSON line.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_in_interpreter(module_file: str, timeout: int = 600) -> dict:
    """Run `module_file` as a script with TRITON_INTERPRET=1 and return the JSON of its last stdout line."""
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run([sys.executable, str(Path(module_file).resolve())], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])
