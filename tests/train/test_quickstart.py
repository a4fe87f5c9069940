"""configs/quickstart.yaml learns MQAR: a shortened run in the default suite, the full one marked slow."""
from __future__ import annotations

import time

import pytest

from mom_train.config import load_config
from mom_train.train import train
from tests.train.conftest import ROOT


def _run(tmp_path, *overrides: str) -> tuple[dict, float]:
    cfg = load_config(ROOT / "configs" / "quickstart.yaml",
                      [f"run.dir={tmp_path}", "run.device=cpu", "logging.progress_bar=false", *overrides],
                      world_size=1)
    q = cfg.data.mqar
    # the task is real: >= 8 pairs, several queries, >= 64 value symbols (chance <= 1/64)
    assert q.num_pairs >= 8 and q.num_queries >= 4 and (q.vocab_size - 2) - (q.vocab_size - 2) // 2 >= 64
    start = time.perf_counter()
    out = train(cfg)
    return out, time.perf_counter() - start


def test_quickstart_short(tmp_path):
    out, seconds = _run(tmp_path, "training.steps=SHORT_STEPS", "eval.interval=SHORT_STEPS", "checkpoint.interval=0")
    print(f"quickstart (short): recall {out['eval_recall']:.3f} in {seconds:.0f} s")
    assert out["eval_recall"] > 0.5


@pytest.mark.slow
def test_quickstart_full(tmp_path):
    out, seconds = _run(tmp_path)
    print(f"quickstart: recall {out['eval_recall']:.3f} in {seconds:.0f} s")
    assert out["eval_recall"] > 0.8
