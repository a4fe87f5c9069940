"""Training with context parallelism (parallel.cp) on CPU / gloo: 2 ranks splitting every packed sequence
train like one process, and resume bitwise from a checkpoint they wrote.

Micro-batches of 3 MQAR sequences of 40 tokens (120 rows) split at row 60, inside the second sequence, so
every step passes delta-rule states and conv halos from rank 0 to rank 1 (4 memories, top-2, shared memory).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import mom_train.train as train_mod
from mom_train.checkpoint import latest_checkpoint, load_main
from mom_train.config import ConfigError
from tests.train.conftest import mqar_config, read_losses, train_ranks


def read_records(run_dir: Path) -> dict[int, dict]:
    """step -> the training record of metrics.jsonl."""
    records = (json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r for r in records if "loss" in r}


CP = ["training.micro_batch_size=3", "training.global_batch_size=6"]


def _spawn(run_dir: Path, preempt_after: int = 0, *overrides: str, world: int = 2, cp: int = 2) -> None:
    train_ranks(run_dir, world, [*CP, f"parallel.cp={cp}", *overrides], preempt_after)


def test_two_context_parallel_ranks_train_like_one_process(tmp_path):
    steps = 6
    torch.set_num_threads(1)
    train_mod.train(mqar_config(tmp_path / "one", *CP))
    _spawn(tmp_path / "cp")
    one, cp = read_records(tmp_path / "one" / "quickstart"), read_records(tmp_path / "cp" / "quickstart")
    assert sorted(one) == sorted(cp) == list(range(1, steps + 1))
    for step in one:
        # the train loss, the router's balance loss over the whole sequence, and the memories' load
        for key in ("loss", "aux_loss"):
            assert abs(cp[step][key] - one[step][key]) <= 1e-5 * abs(one[step][key]), (step, key, cp[step], one[step])
        assert cp[step]["router_load"] == one[step]["router_load"]
    # the same weights after the last step (the updates were the same up to summation order)
    ref = load_main(latest_checkpoint(tmp_path / "one" / "quickstart"), "model")
    got = load_main(latest_checkpoint(tmp_path / "cp" / "quickstart"), "model")
    for name, value in ref.items():
        err = ((got[name] - value).norm() / value.norm().clamp_min(1e-12)).item()
        assert err < 1e-4, f"{name}: rel err {err:.2e}"


def test_two_data_parallel_groups_of_two_train_like_data_parallel_with_and_without_zero(tmp_path):
    # 4 ranks: dp 2 x cp 2 against dp 2 alone (each group must see its own data and sum its halves)
    steps = 6
    _spawn(tmp_path / "dp", world=2, cp=1)
    _spawn(tmp_path / "dpcp", world=4, cp=2)
    dp, dpcp = read_losses(tmp_path / "dp" / "quickstart"), read_losses(tmp_path / "dpcp" / "quickstart")
    assert sorted(dp) == sorted(dpcp) == list(range(1, steps + 1))
    for step in dp:
        assert abs(dpcp[step] - dp[step]) <= 1e-5 * abs(dp[step]), f"step {step}: {dpcp[step]} != {dp[step]}"
    # ZeRO stage 2 over the 4 ranks changes nothing but where the AdamW moments live (and summation order)
    _spawn(tmp_path / "zero", 0, "parallel.zero_stage=2", world=4, cp=2)
    zero = read_losses(tmp_path / "zero" / "quickstart")
    for step in dpcp:
        assert abs(zero[step] - dpcp[step]) <= 1e-5 * abs(dpcp[step]), f"step {step}: {zero[step]} != {dpcp[step]}"
    saved = latest_checkpoint(tmp_path / "dpcp" / "quickstart")
    assert sorted(p.name for p in saved.glob("rank_*.pt")) == [
        "rank_00000.pt", "rank_00000_cp001.pt", "rank_00001.pt", "rank_00001_cp001.pt"]


def test_context_parallel_resume_is_bitwise(tmp_path):
    steps = 6
    _spawn(tmp_path / "a")
    _spawn(tmp_path / "b", 4)
    # grad accumulation 2: 4 batches = 2 steps
    saved = latest_checkpoint(tmp_path / "b" / "quickstart")
    assert saved.name == "step_0000002"
    assert sorted(p.name for p in saved.glob("rank_*.pt")) == ["rank_00000.pt", "rank_00000_cp001.pt"]
    _spawn(tmp_path / "b")
    a, b = read_losses(tmp_path / "a" / "quickstart"), read_losses(tmp_path / "b" / "quickstart")
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    for step in a:
        assert a[step] == b[step], f"step {step}: {a[step]!r} != {b[step]!r}"
    # a single process cannot take over the two ranks' data and RNG state
    with pytest.raises(ConfigError, match="context-parallel"):
        train_mod.train(mqar_config(tmp_path / "b", *CP, "training.steps=8"))


@pytest.mark.parametrize("overrides, match", [
    (["model.arch=transformer", "model.num_heads=2", "model.head_dim=16"], "ring attention"),
    (["model.mom_impl=reference"], "mom_impl=fast"),
    (["training.micro_batch_size=1", "training.seq_len=41", "training.global_batch_size=2"], "equal parts"),
])
def test_context_parallel_config_errors(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        mqar_config(tmp_path, "parallel.cp=2", *overrides, world_size=2)
