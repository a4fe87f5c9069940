"""configs/quickstart.yaml learns MQAR: a shortened run in the default suite, the full one marked slow."""
from __future__ import annotations

import time

import pytest

from mom_train.config import load_config
from mom_train.train import train
from tests.train.conftest import ROOT

# the CI variant: the same model on the smallest instance of the task (2 pairs, 2 queries, 10 tokens; values
# still from 64 symbols, chance 1/64), 180 steps at a constant learning rate after warmup (a short cosine decays
# it before the model learns to recall), evaluated once at the end
SHORT = ["data.mqar.num_pairs=2", "data.mqar.num_queries=2", "training.seq_len=10", "training.steps=180",
         "training.warmup_steps=20", "training.min_lr_ratio=1.0", "eval.interval=180", "checkpoint.interval=0"]


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
    """The recipe learns associative recall: past what copying values from the context can score."""
    out, seconds = _run(tmp_path, *SHORT)
    print(f"quickstart (short): recall {out['eval_recall']:.3f} in {seconds:.0f} s")
    # values are fresh in every sequence, so a model must read them from its context. Copying one of the two
    # values for the first query (right half the time) and the other one for the second query (always right:
    # the first answer is in the input) scores 0.75 without matching keys; only recall gets past 0.8
    assert out["eval_recall"] > 0.8


@pytest.mark.slow
def test_quickstart_full(tmp_path):
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", world_size=1)
    q = cfg.data.mqar
    # the task is real: >= 8 pairs and several queries per sequence
    assert q.num_pairs >= 8 and q.num_queries >= 4
    out, seconds = _run(tmp_path)
    print(f"quickstart: recall {out['eval_recall']:.3f} in {seconds:.0f} s")
    assert out["eval_recall"] > 0.8
