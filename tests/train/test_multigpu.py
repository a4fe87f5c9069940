"""NCCL on 2 GPUs (marked multigpu: skipped without 2 CUDA devices): data, context and tensor parallelism and
ZeRO stages 2 (ours) and 3 (DeepSpeed) each train like one GPU over 5 bf16 steps (losses within bf16
tolerance), and a SIGTERM on 2 GPUs saves a checkpoint from which the run continues bit-identically.

    python -m pytest -m multigpu tests/train/test_multigpu.py

The model is small and uses the compiled Triton kernels (heads of 64, 256-token sequences, 4 memories, top-2,
shared memory); every run sees the same 8 sequences per step.
"""
from __future__ import annotations

from pathlib import Path

import pytest

import mom_train.train as train_mod
from tests.train.conftest import mqar_config, read_losses, train_ranks

pytestmark = pytest.mark.multigpu

STEPS = 5
GPU = ["run.device=cuda", "model.kernel_backend=auto", "model.hidden_size=128", "model.num_heads=2",
       "model.head_dim=64", "training.seq_len=256", "training.micro_batch_size=4", "training.global_batch_size=8",
       f"training.steps={STEPS}", "data.mqar.num_pairs=32", "data.mqar.num_queries=32", "training.precision=bf16"]
# relative tolerance between bf16 runs that sum in different orders
BF16_TOL = 1e-2


def one_gpu(run_dir: Path) -> dict[int, float]:
    train_mod.train(mqar_config(run_dir, *GPU))
    return read_losses(run_dir / "quickstart")


@pytest.mark.parametrize("layout", [[], ["parallel.cp=2"], ["parallel.tp=2"], ["parallel.zero_stage=2"],
                                    ["parallel.zero_stage=3"], ["training.cuda_graphs=true"]],
                         ids=["dp2", "cp2", "tp2", "zero2", "zero3-deepspeed", "dp2-cuda-graphs"])
def test_two_gpus_train_like_one(tmp_path, layout):
    ref = one_gpu(tmp_path / "one")
    train_ranks(tmp_path / "two", 2, [*GPU, *layout])
    got = read_losses(tmp_path / "two" / "quickstart")
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    for step in ref:
        assert abs(got[step] - ref[step]) <= BF16_TOL * abs(ref[step]), (step, got[step], ref[step])


def test_sigterm_and_resume_on_two_gpus_is_bit_identical(tmp_path):
    train_ranks(tmp_path / "straight", 2, GPU)
    train_ranks(tmp_path / "resumed", 2, GPU, preempt_after=2)
    train_ranks(tmp_path / "resumed", 2, GPU)
    straight, resumed = (read_losses(tmp_path / run / "quickstart") for run in ("straight", "resumed"))
    assert sorted(straight) == sorted(resumed) == list(range(1, STEPS + 1))
    for step in straight:
        assert straight[step] == resumed[step], (step, straight[step], resumed[step])
