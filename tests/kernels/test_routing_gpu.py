"""Routing kernels on a real GPU at MoM-340M sizes (L = 16384 tokens, E = 4 memories, top-2, shared memory).

The Triton stream plan must equal `build_stream_plan` exactly; the Triton permutations must match their torch
backend (same fp32 accumulation) in every output and gradient by relative error, for bf16 and fp32, with
F = 1024 and 2056 features and with inputs that are column slices of a wider tensor. A last test runs the
whole routed path under torch.cuda.set_sync_debug_mode("error") to show it has no host sync.
"""
from __future__ import annotations

import pytest
import torch

from mom_train.kernels.routing import build_stream_plan_triton, combine_rows, gather_tokens, select_rows
from mom_train.model.routing import build_stream_plan

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

L, E, TOPK = 16384, 4, 2
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite values in the kernel output"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _routing(seed: int, skewed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_idx [L, k] long, cu_seqlens int32 [N+1]) on the GPU: packed documents with empty and length-1
    ones; skewed routing sends most slots to memory 1 and none to memory 3."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(L, E, generator=gen)
    if skewed:
        scores[:, 1] += 0.8
        scores[:, 3] -= 2.0
    lengths = [1, 0, 63, 65, 0]
    while sum(lengths) < L:
        lengths.append(min(int(torch.randint(1, 4096, (1,), generator=gen)), L - sum(lengths)))
    lengths.insert(len(lengths) // 2, 0)
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    return scores.topk(TOPK, -1).indices.cuda(), cu.cuda()


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "no-shared"])
@pytest.mark.parametrize("skewed", [False, True], ids=["uniform", "skewed"])
def test_plan_equals_build_stream_plan(shared, skewed):
    topk_idx, cu = _routing(seed=int(shared) + 2 * int(skewed), skewed=skewed)
    plan = build_stream_plan_triton(topk_idx, cu, E, shared)
    ref = build_stream_plan(topk_idx, cu, E, shared)
    assert torch.equal(plan.src, ref.src)
    assert torch.equal(plan.dest, ref.dest)
    assert plan.cu_seqlens.dtype == torch.int32 and torch.equal(plan.cu_seqlens, ref.cu_seqlens)


def _leaf(rows: int, F: int, dtype: torch.dtype, wide: int | None = None) -> torch.Tensor:
    """Random [rows, F] requiring grad; with `wide`, the last F columns of a [rows, wide] tensor."""
    full = torch.randn(rows, wide or F, device="cuda").to(dtype)
    return full[:, full.shape[1] - F:].requires_grad_()


def _run_ops(backend: str, x, table, o, weight, plan, grads: dict) -> list[torch.Tensor]:
    """Outputs and gradients of the three ops with one backend."""
    S = plan.num_streams
    gathered = gather_tokens(x, plan.src // S, plan.dest, True, backend=backend)
    selected = select_rows(table, plan.src, backend=backend)
    combined = combine_rows(o, plan.dest, weight, True, backend=backend)
    (dx,) = torch.autograd.grad(gathered, x, grads["gather"])
    (dtable,) = torch.autograd.grad(selected, table, grads["select"])
    do, dweight = torch.autograd.grad(combined, (o, weight), grads["combine"])
    return [gathered, dx, selected, dtable, combined, do, dweight]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("F,wide", [(1024, None), (2056, None), (1024, 2056)], ids=["F1024", "F2056", "F1024-slice"])
def test_triton_permutations_match_torch(dtype, F, wide):
    run_permutations_against_torch(F, wide, dtype)


def run_permutations_against_torch(F: int, wide: int | None, dtype: torch.dtype) -> None:
    """Gather, select and combine (and their gradients) through Triton against the torch backend, F features
    (columns of a `wide`-column tensor when given)."""
    torch.manual_seed(0)
    topk_idx, cu = _routing(seed=7)
    plan = build_stream_plan(topk_idx, cu, E, True)
    R = plan.src.numel()
    x, table, o = _leaf(L, F, dtype, wide), _leaf(L * (E + 1), F, dtype, wide), _leaf(R, F, dtype, wide)
    weight = torch.randn(L, TOPK, device="cuda").softmax(-1).requires_grad_()
    grads = {"gather": torch.randn(R, F, device="cuda").to(dtype),
             "select": torch.randn(R, F, device="cuda").to(dtype),
             "combine": torch.randn(L, F, device="cuda").to(dtype)}
    got = _run_ops("triton", x, table, o, weight, plan, grads)
    ref = _run_ops("torch", x, table, o, weight, plan, grads)
    names = ("gather", "dx", "select", "dtable", "combine", "do", "dweight")
    errs = {name: _rel(g, r) for name, g, r in zip(names, got, ref)}
    bad = {k: v for k, v in errs.items() if not v <= TOL[dtype]}
    assert not bad, f"F={F}: relative errors above {TOL[dtype]}: {bad}"
    assert got[0].dtype == got[2].dtype == got[4].dtype == dtype and got[6].dtype == torch.float32


def test_no_host_sync_in_routing_kernels():
    topk_idx, cu = _routing(seed=11)
    F = 2056
    x = torch.randn(L, F, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    table = torch.randn(L * (E + 1), F, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(L, TOPK, device="cuda").softmax(-1).requires_grad_()
    # warm up (compilation may sync), then check a steady-state step
    for mode in ("default", "error"):
        torch.cuda.set_sync_debug_mode(mode)
        try:
            plan = build_stream_plan_triton(topk_idx, cu, E, True)
            rows = gather_tokens(x, plan.src // plan.num_streams, plan.dest, True)
            rows = rows + select_rows(table, plan.src)
            y = combine_rows(rows, plan.dest, weight, True)
            y.float().square().sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(x.grad).all() and torch.isfinite(table.grad).all() and torch.isfinite(weight.grad).all()
