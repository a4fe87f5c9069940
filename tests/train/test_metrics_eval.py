"""metrics.jsonl content, plots, and the eval / generate commands on a trained checkpoint."""
from __future__ import annotations

import json
import math

import pytest
import torch

import mom_train.train as train_mod
from mom_train.cli import main
from mom_train.parallel.dims import ParallelDims
from mom_train.metrics import Window, peak_flops
from tests.train.conftest import mqar_config


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run_root = tmp_path_factory.mktemp("runs")
    cfg = mqar_config(run_root, "eval.interval=3", "eval.num_batches=2", "logging.interval=2",
                      "checkpoint.interval=3")
    out = train_mod.train(cfg)
    return cfg.run.path, out


def test_metrics_jsonl_and_config(trained_run):
    run_dir, out = trained_run
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    eval_records = [r for r in records if "eval_recall" in r]
    # every logging.interval=2 steps, and at each checkpoint (interval 3)
    assert [r["step"] for r in train_records] == [2, 3, 4, 6]
    assert [r["step"] for r in eval_records] == [3, 6]
    for r in train_records:
        for key in ("loss", "lr", "tokens", "tokens_per_s", "grad_norm", "aux_loss", "skipped_steps", "data"):
            assert key in r, key
        # 2 MoM layers x 4 memories, each row a distribution over the memories
        assert len(r["router_load"]) == 2 and all(abs(sum(row) - 1) < 1e-3 for row in r["router_load"])
        assert math.isfinite(r["loss"]) and r["tokens"] == r["step"] * 4 * 40
    assert 0 <= eval_records[-1]["eval_recall"] <= 1 and out["eval_recall"] == eval_records[-1]["eval_recall"]
    assert (run_dir / "config.yaml").is_file()


def test_eval_generate_plot_commands(trained_run, capsys):
    run_dir, out = trained_run
    assert main(["eval", "--checkpoint", str(run_dir), "eval.num_batches=2"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["step"] == 6 and scores["eval_recall"] == out["eval_recall"]
    assert main(["generate", "--checkpoint", str(run_dir), "--prompt", "1 5 70 9 80 5", "--max-new-tokens", "3",
                 "--temperature", "0"]) == 0
    tokens = capsys.readouterr().out.split()
    assert tokens[:6] == ["1", "5", "70", "9", "80", "5"] and len(tokens) == 9
    assert main(["plot", str(run_dir)]) == 0
    for name in ("loss.png", "lr.png", "throughput.png"):
        assert (run_dir / name).stat().st_size > 0


def test_window_skips_nonfinite_steps():
    window = Window(torch.device("cpu"))
    good, bad = torch.tensor(0.0), torch.tensor(1.0)
    window.add(torch.tensor(6.0), 3, torch.tensor(0.5), torch.tensor([[0.5, 0.5]]), torch.tensor(2.0), good)
    window.add(torch.tensor(float("nan")), 5, torch.tensor(9.0), torch.tensor([[1.0, 0.0]]),
               torch.tensor(float("inf")), bad)
    r = window.reduce(ParallelDims())
    assert r["loss"] == 2.0 and r["grad_norm"] == 2.0 and r["aux_loss"] == 0.5 and r["skipped_steps"] == 1
    assert r["router_load"] == [[0.75, 0.25]]


def test_peak_flops_cpu_is_unknown():
    assert peak_flops(torch.device("cpu")) is None
