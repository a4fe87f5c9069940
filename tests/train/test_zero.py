"""ZeRO stages 1 and 2 in our engine (parallel.zero_stage) on CPU / gloo: 2 ranks with sharded AdamW state
train like 2 plain data-parallel ranks (every step's loss and grad norm, the final weights and the whole
optimizer state in the checkpoint equal to relative 1e-5), keep half the moments each, resume bitwise at the
same stage and continue the same run when the stage changes at a resume."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mom_train.checkpoint import latest_checkpoint, load_main
from mom_train.engine import Engine
from mom_train.model import build_model
from mom_train.parallel.dims import ParallelDims
from mom_train.parallel.parallelize import parallelize
from tests.ranks import free_port
from tests.train.conftest import mqar_config, read_losses, train_ranks

STEPS = 6
# 2 ranks x micro-batch 4 x grad accumulation 2; clipping active (the norm is far above 0.05)
DP = ["training.global_batch_size=16", "training.grad_clip=0.05"]


def read_records(run_dir: Path) -> dict[int, dict]:
    records = (json.loads(line) for line in (run_dir / "quickstart" / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r for r in records if "loss" in r}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def assert_runs_match(got_dir: Path, ref_dir: Path) -> None:
    got, ref = read_records(got_dir), read_records(ref_dir)
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    for step in ref:
        for key in ("loss", "grad_norm"):
            assert abs(got[step][key] - ref[step][key]) <= 1e-5 * abs(ref[step][key]), (step, key, got[step], ref[step])


def assert_checkpoints_match(got_dir: Path, ref_dir: Path) -> None:
    """Both checkpoints hold the whole model and optimizer state, as one process would write them."""
    got_ckpt, ref_ckpt = latest_checkpoint(got_dir / "quickstart"), latest_checkpoint(ref_dir / "quickstart")
    ref_model, got_model = load_main(ref_ckpt, "model"), load_main(got_ckpt, "model")
    for name, value in ref_model.items():
        assert rel(got_model[name], value) < 1e-5, name
    ref, got = load_main(ref_ckpt, "optimizer"), load_main(got_ckpt, "optimizer")
    assert sorted(got["state"]) == sorted(ref["state"])
    assert [g["params"] for g in got["param_groups"]] == [g["params"] for g in ref["param_groups"]]
    assert [g["weight_decay"] for g in got["param_groups"]] == [g["weight_decay"] for g in ref["param_groups"]]
    for i, state in ref["state"].items():
        assert float(got["state"][i]["step"]) == float(state["step"])
        for key in ("exp_avg", "exp_avg_sq"):
            assert rel(got["state"][i][key], state[key]) < 1e-4, (i, key)


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_trains_like_data_parallel(tmp_path, reference_runs, stage):
    dp = reference_runs(2, DP)
    train_ranks(tmp_path / "zero", 2, [*DP, f"parallel.zero_stage={stage}"])
    assert_runs_match(tmp_path / "zero", dp)
    assert_checkpoints_match(tmp_path / "zero", dp)


def test_zero2_resumes_bitwise(tmp_path):
    zero2 = [*DP, "parallel.zero_stage=2"]
    train_ranks(tmp_path / "straight", 2, zero2)
    train_ranks(tmp_path / "resumed", 2, zero2, preempt_after=4)
    assert latest_checkpoint(tmp_path / "resumed" / "quickstart").name == "step_0000002"
    train_ranks(tmp_path / "resumed", 2, zero2)
    straight, resumed = (read_losses(tmp_path / run / "quickstart") for run in ("straight", "resumed"))
    assert sorted(straight) == sorted(resumed) == list(range(1, STEPS + 1))
    for step in straight:
        assert straight[step] == resumed[step], (step, straight[step], resumed[step])


def test_resume_switches_zero_stages(tmp_path, reference_runs):
    # checkpoints hold the whole optimizer state at every stage: 0 -> 2 -> 1 -> 0 continues the same run
    train_ranks(tmp_path / "mixed", 2, DP, preempt_after=2)
    train_ranks(tmp_path / "mixed", 2, [*DP, "parallel.zero_stage=2"], preempt_after=2)
    train_ranks(tmp_path / "mixed", 2, [*DP, "parallel.zero_stage=1"], preempt_after=2)
    train_ranks(tmp_path / "mixed", 2, DP)
    assert_runs_match(tmp_path / "mixed", reference_runs(2, DP))


def _shard_worker(rank: int, world: int, port: int, run_dir: str, out: str, stage: int) -> None:
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
    try:
        cfg = mqar_config(Path(run_dir), *DP, f"parallel.zero_stage={stage}", world_size=world)
        dims = ParallelDims(rank=rank, world_size=world, dp_rank=rank, dp_size=world, world_group=dist.group.WORLD,
                            cpu_group=dist.group.WORLD, grad_group=dist.group.WORLD)
        model = build_model(cfg.model)
        engine = Engine(parallelize(model, dims, cfg), cfg, dims)
        engine.gradients.flat.buffer.fill_(1.0)
        engine.step(torch.zeros(()))
        state = engine.optimizer.optimizer.state.values()
        local = sum(s["exp_avg"].numel() + s["exp_avg_sq"].numel() for s in state) * 4
        total = sum(p.numel() for p in model.parameters()) * 8
        torch.save({"local": local, "total": total}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_keeps_an_even_shard_of_the_moments_per_rank(tmp_path, stage):
    mp.spawn(_shard_worker, args=(2, free_port(), str(tmp_path), str(tmp_path), stage), nprocs=2, join=True)
    counts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    total = counts[0]["total"]
    # AdamW's 8 bytes per parameter, split evenly (to the padding of one element)
    assert counts[0]["local"] + counts[1]["local"] == total
    assert all(abs(c["local"] - total / 2) <= 8 for c in counts), counts
