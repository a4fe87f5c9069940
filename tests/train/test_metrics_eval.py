"""metrics.jsonl content, plots, and the eval / generate commands on a trained checkpoint."""
from __future__ import annotations

import errno
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import mom_train.train as train_mod
from mom_train.checkpoint import checkpoint_config, list_checkpoints, load_model
from mom_train.cli import main
from mom_train import metrics
from mom_train.data import IGNORE_INDEX, build_loader
from mom_train.errors import describe_os_error
from mom_train.eval.evaluate import EVAL_SEED_OFFSET, evaluate
from mom_train.parallel.dims import ParallelDims
from mom_train.metrics import Window, peak_flops
from mom_train.model import ModelOutput
from tests.train.conftest import mqar_config


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run_root = tmp_path_factory.mktemp("runs")
    cfg = mqar_config(run_root, "eval.interval=3", "eval.num_batches=2", "logging.interval=2",
                      "checkpoint.interval=3")
    out = train_mod.train(cfg)
    return cfg.run.path, out


def held_out_scores(checkpoint) -> dict[str, float]:
    """eval_loss and eval_recall of a checkpoint by definition: over the answers of eval.num_batches held-out
    MQAR batches, the mean cross entropy of the logits one position before each answer, and the fraction of
    them whose argmax is the answer."""
    cfg = checkpoint_config(checkpoint)
    model = load_model(checkpoint, cfg, torch.device("cpu"))
    loader = build_loader(cfg, split="eval", seed_offset=EVAL_SEED_OFFSET)
    loss_sum, correct, total = 0.0, 0, 0
    with torch.no_grad():
        for _ in range(cfg.eval.num_batches):
            batch = next(loader)
            logits = model(batch.input_ids, cu_seqlens=batch.cu_seqlens).logits[0]  # [T, V]
            answers = (batch.labels[0] != IGNORE_INDEX).nonzero().flatten()
            before, target = logits[answers - 1].double(), batch.labels[0, answers]
            loss_sum += F.cross_entropy(before, target, reduction="sum").item()
            correct += int((before.argmax(-1) == target).sum())
            total += answers.numel()
    return {"eval_loss": loss_sum / total, "eval_recall": correct / total}


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
    assert out["eval_recall"] == eval_records[-1]["eval_recall"]
    # each evaluation scores the model saved at its step (checkpoint.interval=3) on the held-out stream
    checkpoints = {int(p.name.split("_")[-1]): p for p in list_checkpoints(run_dir)}
    for r in eval_records:
        want = held_out_scores(checkpoints[r["step"]])
        assert r["eval_recall"] == want["eval_recall"], (r, want)
        assert abs(r["eval_loss"] - want["eval_loss"]) <= 1e-5 * want["eval_loss"], (r, want)
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


class EvenAnswersOracle(torch.nn.Module):
    """Knows every answer (it reads the labels) and names it one position before it when the answer symbol
    is even, else names the padding symbol; counts the answers it served and those it got right."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.right, self.total = 0, 0

    def forward(self, input_ids, cu_seqlens=None, labels=None):
        logits = torch.zeros(*input_ids.shape, self.vocab_size)  # [1, T, V], argmax 0 (padding) by default
        answers = (labels[0] != IGNORE_INDEX).nonzero().flatten()
        values = labels[0, answers]
        named = answers[values % 2 == 0]
        logits[0, named - 1, labels[0, named]] = 1.0
        self.right += named.numel()
        self.total += answers.numel()
        return ModelOutput(loss_sum=torch.tensor(0.0), num_valid=torch.tensor(answers.numel()), logits=logits)


def test_eval_recall_is_the_fraction_of_answers_named_one_position_before(tmp_path):
    """evaluate() reports exactly the share of answers whose preceding position's argmax is the answer."""
    cfg = mqar_config(tmp_path, "eval.num_batches=3")
    oracle = EvenAnswersOracle(cfg.model.vocab_size)
    recall = evaluate(oracle, cfg, ParallelDims())["eval_recall"]
    assert oracle.total == 3 * cfg.training.micro_batch_size * cfg.data.mqar.num_queries
    assert 0 < oracle.right < oracle.total
    assert recall == oracle.right / oracle.total


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
    logger = metrics.MetricsLogger(mqar_config(tmp_path), ParallelDims(), 0)
    record = {"step": 1, "loss": 1.0, "lr": 1e-3, "tokens_per_s": 10.0}
    logger.log({**record, "data": {"skipped_bad_json": 2, "truncated_files": 1, "documents": 9}})
    assert "data: skipped so far: 2 bad JSON records, 1 truncated files" in capsys.readouterr().out
    logger.log({**record, "step": 2, "data": {"skipped_bad_json": 2, "truncated_files": 1, "documents": 12}})
    assert "skipped" not in capsys.readouterr().out
    logger.log({**record, "step": 3, "data": {"skipped_bad_json": 3, "truncated_files": 1}})
    assert "3 bad JSON records" in capsys.readouterr().out
    logger.close()


def test_a_failed_metrics_write_leaves_whole_lines(tmp_path, monkeypatch):
    logger = metrics.MetricsLogger(mqar_config(tmp_path), ParallelDims(), 0)
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
