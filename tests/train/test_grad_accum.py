"""Gradient accumulation and data parallelism through `train()` itself: the same sequences trained as one
batch, as several micro-batches of one process, and over two gloo ranks give the same logged losses and
gradient norms and the same final parameters."""
from __future__ import annotations

import copy
import functools
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import mom_train.train as train_mod
from mom_train.checkpoint import latest_checkpoint, load_main
from mom_train.data import Batch, build_loader
from tests.train.conftest import mqar_config, train_ranks

STEPS = 3
# sequences per optimizer step, in every layout
STEP_SEQUENCES = 4
TOLERANCE = 1e-5


class SameSequences:
    """Stand-in for the trainer's loader: each optimizer step's STEP_SEQUENCES sequences are `distinct` fresh
    MQAR sequences tiled STEP_SEQUENCES / distinct times, the same for any micro-batch size or number of
    ranks; data-parallel rank r takes the r-th contiguous share and hands it out in micro-batches."""

    def __init__(self, cfg, dp_rank: int, dp_size: int, distinct: int):
        micro = cfg.training.micro_batch_size
        per_rank = cfg.grad_accum_steps(dp_size) * micro
        assert per_rank * dp_size == STEP_SEQUENCES and STEP_SEQUENCES % distinct == 0
        source_cfg = copy.deepcopy(cfg)
        source_cfg.training.micro_batch_size = distinct
        self.source = build_loader(source_cfg)
        self.repeat = STEP_SEQUENCES // distinct
        self.seq_len = cfg.training.seq_len
        self.bounds = range(dp_rank * per_rank, (dp_rank + 1) * per_rank + 1, micro)
        self.pending: list[Batch] = []

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        if not self.pending:
            self.pending = self._step_micro_batches()
        return self.pending.pop(0)

    def _step_micro_batches(self) -> list[Batch]:
        batch = next(self.source)
        num_seqs = batch.cu_seqlens.numel() - 1
        assert torch.equal(batch.cu_seqlens, torch.arange(num_seqs + 1, dtype=torch.int32) * self.seq_len)
        ids = batch.input_ids.view(num_seqs, self.seq_len).repeat(self.repeat, 1)  # [STEP_SEQUENCES, L]
        labels = batch.labels.view(num_seqs, self.seq_len).repeat(self.repeat, 1)  # [STEP_SEQUENCES, L]
        micro = []
        for start, stop in zip(self.bounds[:-1], self.bounds[1:]):
            cu_seqlens = torch.arange(stop - start + 1, dtype=torch.int32) * self.seq_len
            micro.append(Batch(ids[start:stop].reshape(1, -1), labels[start:stop].reshape(1, -1), cu_seqlens,
                               batch.stats))
        return micro

    def state_dict(self) -> dict:
        return self.source.state_dict()

    def load_state_dict(self, sd: dict) -> None:
        self.source.load_state_dict(sd)

    def close(self) -> None:
        self.source.close()


def same_sequences_loader(cfg, dp_rank: int = 0, dp_size: int = 1, split: str = "train", *,
                          distinct: int) -> SameSequences:
    assert split == "train"
    return SameSequences(cfg, dp_rank, dp_size, distinct)


@dataclass(frozen=True)
class Case:
    """aux_loss_coef and the distinct sequences per step. The balance loss is a statistic of each
    micro-batch, so with it on, every micro-batch holds the same sequences (its statistics equal the batch's);
    its coefficient is 10x the recipe's so that its share of the gradient is well above the tolerance."""
    aux_loss_coef: float
    distinct: int


CASES = [pytest.param(Case(0.0, STEP_SEQUENCES), id="aux-off"), pytest.param(Case(0.1, 1), id="aux-on")]
# (data-parallel ranks, micro-batch size): the same 4 sequences per step
LAYOUTS = [pytest.param((1, 2), id="1rank-accum2"), pytest.param((1, 1), id="1rank-accum4"),
           pytest.param((2, 1), id="2ranks-accum2")]


def overrides(case: Case, micro: int) -> list[str]:
    return [f"model.aux_loss_coef={case.aux_loss_coef}", f"training.micro_batch_size={micro}",
            f"training.global_batch_size={STEP_SEQUENCES}", f"training.steps={STEPS}"]


def run(run_dir: Path, case: Case, world: int, micro: int) -> tuple[dict[int, dict], dict[str, torch.Tensor]]:
    """Train on `world` ranks with micro-batches of `micro`; (step -> logged train record, final parameters)."""
    loader = functools.partial(same_sequences_loader, distinct=case.distinct)
    if world == 1:
        build = train_mod.build_loader
        train_mod.build_loader = loader
        try:
            train_mod.train(mqar_config(run_dir, *overrides(case, micro)))
        finally:
            train_mod.build_loader = build
    else:
        train_ranks(run_dir, world, overrides(case, micro), loader=loader)
    path = run_dir / "quickstart"
    records = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if "loss" in r}, load_main(latest_checkpoint(path), "model")


@pytest.fixture(scope="module")
def one_batch(tmp_path_factory):
    """The reference of each case: one process, all STEP_SEQUENCES sequences in one micro-batch."""
    cache: dict[Case, tuple] = {}

    def get(case: Case) -> tuple[dict[int, dict], dict[str, torch.Tensor]]:
        if case not in cache:
            cache[case] = run(tmp_path_factory.mktemp("one_batch"), case, 1, STEP_SEQUENCES)
        return cache[case]

    return get


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-12))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES)
def test_micro_batches_and_ranks_train_like_one_batch(tmp_path, one_batch, case, layout):
    """Logged loss and grad norm of every step (and the aux loss where every micro-batch holds the same
    sequences, so its statistics are the batch's), and the final parameters, equal one batch's."""
    world, micro = layout
    want_records, want_params = one_batch(case)
    got_records, got_params = run(tmp_path, case, world, micro)
    assert sorted(got_records) == sorted(want_records) == list(range(1, STEPS + 1))
    for step, want in want_records.items():
        got = got_records[step]
        for key in ("loss", "grad_norm", *(("aux_loss",) if case.distinct == 1 else ())):
            assert abs(got[key] - want[key]) <= TOLERANCE * abs(want[key]), \
                f"step {step} {key}: {got[key]} != {want[key]}"
    for name, want in want_params.items():
        assert rel_err(got_params[name], want) <= TOLERANCE, f"{name}: relative error {rel_err(got_params[name], want)}"
