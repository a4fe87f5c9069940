"""metrics.jsonl content, plots, and the eval / generate commands on a trained checkpoint."""
from __future__ import annotations

import errno
import json
import math
import os

import pytest
import torch

import mom_train.train as train_mod
from mom_train.cli import main
from mom_train.distributed import ParallelContext
from mom_train import metrics
from mom_train.errors import describe_os_error
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
    r = window.reduce(ParallelContext())
    assert r["loss"] == 2.0 and r["grad_norm"] == 2.0 and r["aux_loss"] == 0.5 and r["skipped_steps"] == 1
    assert r["router_load"] == [[0.75, 0.25]]


def test_peak_flops_cpu_is_unknown():
    assert peak_flops(torch.device("cpu")) is None


def test_eta_excludes_warm_up_and_counts_evaluations(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: clock[0])
    eta = metrics.Eta(total=100, eval_interval=20, checkpoint_interval=0)
    # step 1 pays a 10 s warm-up, then 1 s per step; each evaluation takes 3 s
    clock[0] = 10.0
    eta.advance(1)
    for step in range(2, 22):
        clock[0] += 1.0
        eta.advance(step)
        if step == 3:
            # no evaluation timed yet: the steps alone
            assert eta.seconds() == pytest.approx(97.0)
        if step == 20:
            clock[0] += 3.0
            eta.pause("eval", 3.0)
    # 79 steps and the evaluations at 40, 60, 80, 100
    assert eta.seconds() == pytest.approx(79.0 + 4 * 3.0)


def test_skipped_records_reach_the_console(tmp_path, capsys):
    logger = metrics.MetricsLogger(mqar_config(tmp_path), ParallelContext(), 0)
    record = {"step": 1, "loss": 1.0, "lr": 1e-3, "tokens_per_s": 10.0}
    logger.log({**record, "data": {"skipped_bad_json": 2, "truncated_files": 1, "documents": 9}})
    assert "data: skipped so far: 2 bad JSON records, 1 truncated files" in capsys.readouterr().out
    logger.log({**record, "step": 2, "data": {"skipped_bad_json": 2, "truncated_files": 1, "documents": 12}})
    assert "skipped" not in capsys.readouterr().out
    logger.log({**record, "step": 3, "data": {"skipped_bad_json": 3, "truncated_files": 1}})
    assert "3 bad JSON records" in capsys.readouterr().out
    logger.close()


def test_a_failed_metrics_write_leaves_whole_lines(tmp_path, monkeypatch):
    logger = metrics.MetricsLogger(mqar_config(tmp_path), ParallelContext(), 0)
    logger.log({"step": 1, "eval_loss": 1.0})
    real_write = os.write

    def disk_full(fd, data):
        # half the record reaches the disk, then the disk is full
        real_write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(metrics.os, "write", disk_full)
    with pytest.raises(OSError) as e:
        logger.log({"step": 2, "eval_loss": 2.0})
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(logger.path)
    assert "disk full writing" in describe_os_error(e.value)
    monkeypatch.setattr(metrics.os, "write", real_write)
    logger.close()
    assert [json.loads(line)["step"] for line in logger.path.read_text().splitlines()] == [1]
