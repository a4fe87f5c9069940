"""configs/quickstart.yaml learns MQAR: a shortened run in the default suite, the full one marked slow."""
from __future__ import annotations

import time

import pytest

from mom_train.config import load_config
from mom_train.train import train
from tests.train.conftest import ROOT

# the CI variant: the same model and recipe on a smaller instance of the task (4 pairs, 4 queries, 20 tokens;
# values still from 64 symbols, chance 1/64) for 500 steps
SHORT = ["data.mqar.num_pairs=4", "data.mqar.num_queries=4", "training.seq_len=20", "training.steps=500",
         "eval.interval=500", "checkpoint.interval=0"]


def _run(tmp_path, *overrides: str) -> tuple[dict, float]:
    cfg = load_config(ROOT / "configs" / "quickstart.yaml",
                      [f"run.dir={tmp_path}", "logging.progress_bar=false", *overrides], world_size=1)
    q = cfg.data.mqar
    num_values = (q.vocab_size - 2) - (q.vocab_size - 2) // 2
    assert num_values >= 64
    start = time.perf_counter()
    out = train(cfg)
    return out, time.perf_counter() - start


def test_quickstart_short(tmp_path):
    out, seconds = _run(tmp_path, *SHORT)
    print(f"quickstart (short): recall {out['eval_recall']:.3f} in {seconds:.0f} s")
    # 1/64 by chance: only recall from context gets past 0.1 (the full run in test_quickstart_full gets > 0.8)
    assert out["eval_recall"] > 0.1


@pytest.mark.slow
def test_quickstart_full(tmp_path):
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", world_size=1)
    q = cfg.data.mqar
    # the task is real: >= 8 pairs and several queries per sequence
    assert q.num_pairs >= 8 and q.num_queries >= 4
    out, seconds = _run(tmp_path)
    print(f"quickstart: recall {out['eval_recall']:.3f} in {seconds:.0f} s")
    assert out["eval_recall"] > 0.8
