"""Whole models under context parallelism: a packed micro-batch split over N ranks (gloo, CPU) gives the
single-process loss and, after summing over the ranks, every parameter gradient.

Documents cross the rank boundaries (one spans all ranks), with an empty and a one-token document; the MoM
has 4 memories, top-2 and a shared memory, so every memory's state and conv halo cross ranks on its own.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mom_train.model import build_model
from mom_train.kernels.cp import ContextParallel
from mom_train.parallel.context import shard_batch
from tests.model.test_lm import VOCAB, tiny_config
from tests.ranks import free_port

LENGTHS = [70, 0, 1, 130, 63]  # 264 rows: 132 per rank at cp=2, 88 at cp=3


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (1, sum(LENGTHS)), generator=torch.Generator().manual_seed(0))
    cu = torch.tensor([0] + torch.tensor(LENGTHS).cumsum(0).tolist(), dtype=torch.int32)
    return ids, cu


def _worker(rank: int, world: int, port: int, arch: str) -> None:
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
    try:
        torch.set_num_threads(1)
        torch.manual_seed(0)
        model = build_model(tiny_config(arch))
        ids, cu = _batch()
        local_ids, targets, local_cu, context = shard_batch(ids, ids, cu, dist.group.WORLD)
        assert isinstance(context, ContextParallel)
        out = model(local_ids, cu_seqlens=local_cu, labels=targets, context=context)
        # MoM: each rank's aux loss is its share of the whole sequence's
        (out.loss_sum + out.aux_loss).backward()
        loss_sum, aux_loss = out.loss_sum.detach().clone(), out.aux_loss.detach().clone()
        num_valid = out.num_valid.clone()
        for t in (loss_sum, aux_loss, num_valid):
            dist.all_reduce(t)
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        for g in grads.values():
            dist.all_reduce(g)
        if rank == 0:
            model.zero_grad()
            full = model(ids, cu_seqlens=cu, labels=ids)
            (full.loss_sum + full.aux_loss).backward()
            assert int(num_valid) == int(full.num_valid) == sum(n - 1 for n in LENGTHS if n > 0)
            err = ((loss_sum - full.loss_sum).abs() / full.loss_sum.abs()).item()
            assert err < 1e-6, f"loss_sum: rel err {err:.2e}"
            assert ((aux_loss - full.aux_loss).abs() <= 1e-6 * full.aux_loss.abs().clamp_min(1e-12)).item()
            assert (arch == "mom") == bool(full.aux_loss > 0)
            for name, p in model.named_parameters():
                ref = p.grad
                err = ((grads[name] - ref).norm() / ref.norm().clamp_min(1e-12)).item()
                assert err < 1e-5, f"{name}: rel err {err:.2e}"
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("arch", ["gated_deltanet", "mom"])
def test_ranks_equal_one_process(arch: str, world: int):
    mp.spawn(_worker, args=(world, free_port(), arch), nprocs=world, join=True)


def test_transformer_and_decoding_refuse_context():
    ids, cu = _batch()
    context = ContextParallel(group=None, continues_out=False)
    with pytest.raises(ValueError, match="ring attention"):
        build_model(tiny_config("transformer"))(ids, cu_seqlens=cu, labels=ids, context=context)
    with pytest.raises(ValueError, match="packed"):
        build_model(tiny_config("mom"))(ids.view(2, -1), labels=ids.view(2, -1), context=context)
