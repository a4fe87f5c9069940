"""configs/quickstart.yaml as shipped learns MQAR to recall >= 0.9: in-process in the default suite (about two
minutes on 2 cores), and as a user runs it (the CLI from a fresh runs/, 180 s, first ETA) marked slow."""
from __future__ import annotations

import os
import re
import subprocess
import time

import pytest
import torch

from mom_train.config import load_config
from mom_train.data.mqar import key_value_ranges
from mom_train.train import train
from tests.train.cli import command, env
from tests.train.conftest import ROOT

QUICKSTART = ROOT / "configs" / "quickstart.yaml"


def test_quickstart_config_is_the_real_task():
    q = load_config(QUICKSTART, world_size=1).data.mqar
    _, values = key_value_ranges(q.vocab_size)
    # 8 pairs, every key queried, a value guessed from 64 symbols is right 1/64 of the time
    assert (q.num_pairs, q.num_queries, len(values)) == (8, 8, 64)


def test_quickstart(tmp_path, capsys):
    cfg = load_config(QUICKSTART, [f"run.dir={tmp_path}", "logging.progress_bar=false"], world_size=1)
    # the suite runs one thread per test; the quickstart is meant for the whole (2-core) machine
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    try:
        start = time.perf_counter()
        out = train(cfg)
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    # shown in the test log even when output is captured
    with capsys.disabled():
        print(f"\nquickstart: recall {out['eval_recall']:.3f} (chance 1/64) after {out['step']} steps, "
              f"{seconds:.0f} s wall")
    assert out["step"] == cfg.training.steps
    assert out["eval_recall"] >= 0.9


# tqdm's bar: "... 3/600 [00:01, eta 1:55]" or with the loss etc. before the remaining time
BAR = re.compile(r"(\d+)/(\d+) \[(\d+):(\d+)(?::(\d+))?[^\]]*?eta (\d+):(\d+)(?::(\d+))?\]")


def _seconds(*parts: str | None) -> int:
    total = 0
    for p in parts:
        if p is not None:
            total = total * 60 + int(p)
    return total


@pytest.mark.slow
def test_quickstart_as_a_user_runs_it(tmp_path):
    """README line 1 from a fresh directory: recall >= 0.9 within 180 s wall, the first remaining-time estimate
    within 2x of the time it then took, and device, parameters, run dir and chance printed before the bar."""
    start = time.perf_counter()
    out = subprocess.run(command("train", "--config", str(QUICKSTART)), cwd=tmp_path, capture_output=True, text=True,
                         env={**env(), "OMP_NUM_THREADS": str(min(2, os.cpu_count() or 1))}, timeout=900)
    wall = time.perf_counter() - start
    assert out.returncode == 0, out.stderr
    recall = float(re.search(r"finished at step \d+: .*eval_recall ([0-9.]+)", out.stdout).group(1))
    bars = [m.groups() for m in BAR.finditer(out.stderr.replace("\r", "\n"))]
    first = bars[0]
    elapsed_first, eta_first = _seconds(*first[2:5]), _seconds(*first[5:8])
    elapsed_last = _seconds(*bars[-1][2:5])
    print(f"quickstart CLI: recall {recall:.3f} in {wall:.0f} s wall; first ETA {eta_first} s at step {first[0]}, "
          f"took {elapsed_last - elapsed_first} s")
    for word in ("device:", "parameters", "run dir:", "chance recall 1/64"):
        assert word in out.stdout
    assert recall >= 0.9
    assert wall <= 180
    assert 0.5 <= eta_first / max(elapsed_last - elapsed_first, 1) <= 2
