"""Whole models under tensor parallelism (gloo, CPU, fp32): tp ranks give the one-process loss, aux loss and,
once sharded gradients are gathered and partial ones summed, every parameter gradient.

Each worker builds the one-process model (same seed), runs it as the reference, then shards a copy with the
trainer's `parallelize` and runs the same packed batch (documents of uneven length, an empty and a one-token
one). The MoM has 4 memories, top-2, a shared memory and a skewed router (uneven loads), on the fast path.
Sequence parallelism on and off; 2 and 4 ranks.
"""
from __future__ import annotations

import copy
import dataclasses
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mom_train.config import load_config
from mom_train.model import build_model
from mom_train.parallel.dims import init_parallel, teardown
from mom_train.parallel.grad import is_sharded, sum_partial_grads
from mom_train.parallel.parallelize import parallelize
from mom_train.parallel.tensor import unshard_tensor
from tests.model.test_lm import VOCAB, tiny_config
from tests.ranks import free_port
from tests.train.conftest import ROOT

LENGTHS = [5, 12, 0, 1, 22, 8]  # 48 tokens: 24 per rank at tp=2, 12 at tp=4
CASES = [("mom", True), ("mom", False), ("gated_deltanet", True), ("gated_deltanet", False),
         ("transformer", True), ("transformer", False)]


def model_config(arch: str):
    cfg = dataclasses.replace(tiny_config(arch), num_heads=4, head_dim=8)
    if arch == "transformer":
        cfg.head_dim = cfg.hidden_size // cfg.num_heads
    return cfg


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (1, sum(LENGTHS)), generator=torch.Generator().manual_seed(1))
    cu = torch.tensor([0] + torch.tensor(LENGTHS).cumsum(0).tolist(), dtype=torch.int32)
    return ids, cu


def _skew_router(model) -> None:
    """Uneven memory loads: memory 0 favoured, the last one rarely chosen."""
    with torch.no_grad():
        for block in model.layers:
            if hasattr(block.mixer, "router"):
                block.mixer.router.weight[0] += 0.3
                block.mixer.router.weight[-1] -= 0.3


def _full_grads(model, dims) -> dict[str, torch.Tensor]:
    """Every parameter's whole gradient: partial ones summed over tp, sharded ones gathered."""
    params = list(model.parameters())
    sum_partial_grads(params, dims)
    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        if is_sharded(p):
            parts = [torch.empty_like(g) for _ in range(dims.tp_size)]
            dist.all_gather(parts, g.contiguous(), group=dims.tp_group)
            g = unshard_tensor(parts, p.tp_shard, g.shape[p.tp_shard.dim] * dims.tp_size)
        out[name] = g
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def _worker(rank: int, world: int, port: int, cases: list) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    ids, cu = _batch()
    dims = None
    for arch, sp in cases:
        cfg = load_config(ROOT / "configs" / "quickstart.yaml",
                          ["run.device=cpu", f"parallel.tp={world}", f"parallel.sequence_parallel={sp}"],
                          world_size=world)
        cfg.model = model_config(arch)
        if dims is None:
            dims = init_parallel(cfg)
        dims.sequence_parallel = sp
        torch.manual_seed(0)
        reference = build_model(cfg.model)
        _skew_router(reference)
        model = copy.deepcopy(reference)
        ref = reference(ids, cu_seqlens=cu, labels=ids)
        (ref.loss_sum + ref.aux_loss).backward()

        parallel = parallelize(model, dims, cfg)
        out = parallel.model(ids, cu_seqlens=cu, labels=ids)
        (out.loss_sum + out.aux_loss).backward()
        loss_sum, aux_loss = out.loss_sum.detach().clone(), out.aux_loss.detach().clone()
        for t in (loss_sum, aux_loss):
            dist.all_reduce(t, group=dims.tp_group)
        label = f"{arch} sp={sp} tp={world}"
        assert _rel(loss_sum, ref.loss_sum) < 1e-6, (label, float(loss_sum), float(ref.loss_sum))
        if arch == "mom":
            assert _rel(aux_loss, ref.aux_loss) < 1e-6, (label, float(aux_loss), float(ref.aux_loss))
            assert torch.equal(out.router_load, ref.router_load), label
        grads = _full_grads(parallel.model, dims)
        for name, p in reference.named_parameters():
            err = _rel(grads[name], p.grad)
            assert err < 1e-5, f"{label}: {name} grad rel err {err:.2e}"
    teardown(dims)


@pytest.mark.parametrize("world", [2, 4])
def test_tensor_parallel_models_equal_one_process(world):
    cases = CASES if world == 2 else [("mom", True), ("gated_deltanet", False)]
    mp.spawn(_worker, args=(world, free_port(), cases), nprocs=world, join=True)
