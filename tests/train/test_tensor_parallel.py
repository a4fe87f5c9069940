"""Training with tensor parallelism (parallel.tp) on CPU / gloo: tp ranks train like one process, compose with
data and context parallelism and ZeRO stage 1, and a run saved at tp=2 resumes at tp=1 and at tp=4.

Every step's loss, aux loss, gradient norm and router load must equal the one-process run's (relative 1e-5),
and the final weights (gathered into the checkpoint) must too.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import mom_train.train as train_mod
from mom_train.checkpoint import latest_checkpoint, load_main
from mom_train.config import ConfigError
from tests.train.conftest import mqar_config, train_ranks

STEPS = 6
# 4 memories, top-2, shared memory; micro-batches of 4 MQAR sequences (160 tokens: 80 per tp rank), 2 per step
TP = ["training.micro_batch_size=4", "training.global_batch_size=8"]


def read_records(run_dir: Path) -> dict[int, dict]:
    """step -> the training record of metrics.jsonl."""
    records = (json.loads(line) for line in (run_dir / "quickstart" / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r for r in records if "loss" in r}


def assert_same_training(got_dir: Path, ref_dir: Path, keys=("loss", "aux_loss", "grad_norm")) -> None:
    got, ref = read_records(got_dir), read_records(ref_dir)
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    for step in ref:
        for key in keys:
            assert abs(got[step][key] - ref[step][key]) <= 1e-5 * abs(ref[step][key]), (step, key, got[step], ref[step])
        for row_got, row_ref in zip(got[step]["router_load"], ref[step]["router_load"]):
            assert row_got == pytest.approx(row_ref, abs=1e-4), step
    # the checkpoint holds the whole model whatever the layout: the same weights after the last step
    ref_model = load_main(latest_checkpoint(ref_dir / "quickstart"), "model")
    got_model = load_main(latest_checkpoint(got_dir / "quickstart"), "model")
    assert sorted(got_model) == sorted(ref_model)
    for name, value in ref_model.items():
        err = ((got_model[name] - value).norm() / value.norm().clamp_min(1e-12)).item()
        assert err < 1e-4, f"{name}: rel err {err:.2e}"


@pytest.mark.parametrize("sp", [True, False], ids=["sequence-parallel", "replicated-stream"])
def test_two_tensor_parallel_ranks_train_like_one_process(tmp_path, reference_runs, sp):
    torch.set_num_threads(1)
    train_ranks(tmp_path / "tp", 2, [*TP, "parallel.tp=2", f"parallel.sequence_parallel={sp}"])
    assert_same_training(tmp_path / "tp", reference_runs(1, TP))


@pytest.mark.parametrize("overrides", [["parallel.zero_stage=2", "training.activation_checkpointing=true"],
                                       ["parallel.zero_stage=3"]], ids=["zero2-recompute", "deepspeed-zero3"])
def test_tensor_parallel_composes_with_data_parallel_and_zero(tmp_path, reference_runs, overrides):
    # 4 ranks: dp 2 x tp 2 with ZeRO over the dp ranks (ours at stage 2 with blocks recomputed in backward, and
    # DeepSpeed's stage 3 with megatron-core's groups) against dp 2
    train_ranks(tmp_path / "dptp", 4, [*TP, "parallel.tp=2", *overrides])
    assert_same_training(tmp_path / "dptp", reference_runs(2, TP))
    saved = latest_checkpoint(tmp_path / "dptp" / "quickstart")
    # the tp ranks of a replica share their data position and RNG: one file per data-parallel rank
    assert sorted(p.name for p in saved.glob("rank_*.pt")) == ["rank_00000.pt", "rank_00001.pt"]


def test_tensor_parallel_composes_with_context_parallel(tmp_path):
    # 4 ranks: cp 2 x tp 2 against cp 2 alone (each rank holds a head shard of a sequence shard)
    cp = ["training.micro_batch_size=3", "training.global_batch_size=6", "parallel.cp=2"]
    train_ranks(tmp_path / "cp", 2, cp)
    train_ranks(tmp_path / "cptp", 4, [*cp, "parallel.tp=2"])
    assert_same_training(tmp_path / "cptp", tmp_path / "cp")


def test_saved_at_two_tensor_parallel_ranks_resumes_in_one_process(tmp_path, reference_runs):
    torch.set_num_threads(1)
    # preempted after 3 steps (2 micro-batches per step), then resumed at tp=1
    train_ranks(tmp_path / "moved", 2, [*TP, "parallel.tp=2"], preempt_after=6)
    assert latest_checkpoint(tmp_path / "moved" / "quickstart").name == "step_0000003"
    train_mod.train(mqar_config(tmp_path / "moved", *TP))
    assert_same_training(tmp_path / "moved", reference_runs(1, TP))


def test_saved_at_two_tensor_parallel_ranks_resumes_at_four(tmp_path, reference_runs):
    # 4 heads of 16 so that 4 ranks split them; weights and AdamW moments are resharded from the whole
    # checkpoint onto the finer split
    heads = [*TP, "model.num_heads=4"]
    train_ranks(tmp_path / "moved", 2, [*heads, "parallel.tp=2"], preempt_after=6)
    assert latest_checkpoint(tmp_path / "moved" / "quickstart").name == "step_0000003"
    train_ranks(tmp_path / "moved", 4, [*heads, "parallel.tp=4"])
    assert_same_training(tmp_path / "moved", reference_runs(1, heads))


@pytest.mark.parametrize("overrides, match", [
    (["model.num_heads=3", "model.head_dim=16"], "divisible by `parallel.tp`"),
    (["model.intermediate_size=255"], "MLP width"),
    (["training.micro_batch_size=1", "training.seq_len=41", "training.global_batch_size=2"], "token shards"),
])
def test_tensor_parallel_config_errors(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        mqar_config(tmp_path, "parallel.tp=2", *overrides, world_size=2)


def _flat_worker(rank: int, world: int, port: int, run_dir: str, out: str) -> None:
    """Steps of the CUDA-graph engine path (flat gradient buffer, run eagerly: no capture on CPU) at tp=2."""
    import os

    from mom_train.parallel.dims import init_parallel, teardown
    from tests.train.test_graphed_step import _global_batches, _run_engine_steps

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    cfg = mqar_config(Path(run_dir), *TP, "parallel.tp=2", "training.cuda_graphs=true", "training.grad_clip=0.05",
                      world_size=world)
    dims = init_parallel(cfg)
    params, losses, norms = _run_engine_steps(cfg, _global_batches(cfg, 3, split=9), dims)
    if rank == 0:
        torch.save({"params": params, "losses": losses, "norms": norms}, out)
    teardown(dims)


def test_flat_gradient_engine_at_two_tensor_parallel_ranks_equals_one_process(tmp_path):
    """The CUDA-graph path's flat buffer: the tp-partial slice summed over tp, the norm counting sharded
    parameters over every rank, clipping active (grad_clip 0.05)."""
    import torch.multiprocessing as mp

    from mom_train.parallel.dims import ParallelDims
    from tests.ranks import free_port
    from tests.train.test_graphed_step import _global_batches, _run_engine_steps

    out = tmp_path / "tp.pt"
    mp.spawn(_flat_worker, args=(2, free_port(), str(tmp_path), str(out)), nprocs=2, join=True)
    cfg = mqar_config(tmp_path, *TP, "training.cuda_graphs=true", "training.grad_clip=0.05")
    params, losses, norms = _run_engine_steps(cfg, _global_batches(cfg, 3, split=9), ParallelDims())
    got = torch.load(out)
    assert min(norms) > 0.05
    for a, b in zip(got["losses"] + got["norms"], losses + norms):
        assert abs(a - b) <= 1e-5 * abs(b), (got["losses"], losses, got["norms"], norms)
    for name, value in params.items():
        err = ((got["params"][name] - value).norm() / value.norm().clamp_min(1e-12)).item()
        assert err < 1e-5, f"{name}: rel err {err:.2e}"
