"""ZeRO stage 1 (parallel.zero_stage=1) on CPU / gloo: 2 ranks with sharded optimizer state train exactly like
2 plain data-parallel ranks, keep about half the AdamW moments each, and resume bitwise from checkpoints
holding the full (consolidated) optimizer state."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mom_train.checkpoint import latest_checkpoint, load_main
from mom_train.config import ConfigError
from mom_train.engine import Engine
from mom_train.model import build_model
from mom_train.parallel.dims import ParallelDims
from mom_train.parallel.parallelize import parallelize
from tests.ranks import free_port
from tests.train.conftest import mqar_config, read_losses, train_ranks

# 2 ranks x micro-batch 4 x grad accumulation 2
DP = ["training.global_batch_size=16"]


def test_zero1_trains_like_data_parallel_and_resumes_bitwise(tmp_path):
    steps = 6
    train_ranks(tmp_path / "dp", 2, DP)
    train_ranks(tmp_path / "zero", 2, [*DP, "parallel.zero_stage=1"])
    train_ranks(tmp_path / "resumed", 2, [*DP, "parallel.zero_stage=1"], preempt_after=4)
    train_ranks(tmp_path / "resumed", 2, [*DP, "parallel.zero_stage=1"])
    dp, zero, resumed = (read_losses(tmp_path / run / "quickstart") for run in ("dp", "zero", "resumed"))
    assert sorted(dp) == sorted(zero) == sorted(resumed) == list(range(1, steps + 1))
    for step in dp:
        assert dp[step] == zero[step] == resumed[step], (step, dp[step], zero[step], resumed[step])
    # the checkpoint holds the whole optimizer state, as a single process would write it
    ref = load_main(latest_checkpoint(tmp_path / "dp" / "quickstart"), "optimizer")
    got = load_main(latest_checkpoint(tmp_path / "zero" / "quickstart"), "optimizer")
    assert sorted(got["state"]) == sorted(ref["state"])
    for i, state in ref["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(got["state"][i][key], state[key]), (i, key)
    for name, value in load_main(latest_checkpoint(tmp_path / "dp" / "quickstart"), "model").items():
        assert torch.equal(load_main(latest_checkpoint(tmp_path / "zero" / "quickstart"), "model")[name], value)


def test_resume_switches_zero_on_and_off(tmp_path):
    # checkpoints hold the whole optimizer state either way: stage 0 -> 1 -> 0 continues the same run
    steps = 6
    train_ranks(tmp_path / "dp", 2, DP)
    train_ranks(tmp_path / "mixed", 2, DP, preempt_after=2)
    train_ranks(tmp_path / "mixed", 2, [*DP, "parallel.zero_stage=1"], preempt_after=2)
    train_ranks(tmp_path / "mixed", 2, DP)
    dp, mixed = read_losses(tmp_path / "dp" / "quickstart"), read_losses(tmp_path / "mixed" / "quickstart")
    assert sorted(dp) == sorted(mixed) == list(range(1, steps + 1))
    for step in dp:
        assert dp[step] == mixed[step], (step, dp[step], mixed[step])


def _shard_worker(rank: int, world: int, port: int, run_dir: str, out: str) -> None:
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
    try:
        cfg = mqar_config(Path(run_dir), *DP, "parallel.zero_stage=1", world_size=world)
        dims = ParallelDims(rank=rank, world_size=world, dp_rank=rank, dp_size=world, world_group=dist.group.WORLD,
                            cpu_group=dist.group.WORLD, grad_group=dist.group.WORLD)
        model = build_model(cfg.model)
        engine = Engine(parallelize(model, dims, cfg), cfg, dims)
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        engine.step(torch.zeros(()))
        local = sum(s["exp_avg"].numel() for s in engine.optimizer.optim.state.values())
        total = sum(p.numel() for p in model.parameters())
        torch.save({"local": local, "total": total}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_zero1_keeps_a_shard_of_the_moments_per_rank(tmp_path):
    mp.spawn(_shard_worker, args=(2, free_port(), str(tmp_path), str(tmp_path)), nprocs=2, join=True)
    counts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    total = counts[0]["total"]
    assert counts[0]["local"] + counts[1]["local"] == total
    # shards are whole parameters, balanced by size: neither rank keeps most of the state
    assert all(c["local"] < 0.75 * total for c in counts)


@pytest.mark.parametrize("stage", [2, 3])
def test_higher_zero_stages_are_refused(tmp_path, stage):
    with pytest.raises(ConfigError, match="zero_stage=1"):
        mqar_config(tmp_path, f"parallel.zero_stage={stage}")
