"""Routing kernels: the Triton stream plan and permutations (under TRITON_INTERPRET=1, in a subprocess) and
their torch fallbacks, against plain indexing in float64 and against `build_stream_plan`.

The interpreter must be switched on before triton is imported, and the rest of the suite may import triton
first, so the Triton cases run once in a child process (this file run as a script) and report relative
errors (permutations) or exact-equality flags (plan) as JSON; each parametrised test checks its own case.
"""
from __future__ import annotations

import json
from typing import NamedTuple

import pytest
import torch

from mom_train.kernels.routing import (
    build_stream_plan_auto,
    build_stream_plan_triton,
    combine_rows,
    gather_tokens,
    select_rows,
)
from mom_train.model.routing import build_stream_plan
from tests.kernels.interpreter import run_in_interpreter


class Case(NamedTuple):
    """A routed batch: document lengths, E memories (the last `unused` never chosen), top-k, F features,
    shared memory, dtype, extra columns around each input row (a column slice of a wider tensor, also used
    for the upstream gradients), extra buffer / table rows beyond the plan's."""
    docs: list[int]
    num_memories: int
    topk: int
    features: int
    shared: bool
    dtype: str = "float32"
    row_pad: int = 0
    unused: int = 0
    extra_rows: int = 0


CASES = {
    "L1-k1-F7-shared": Case([1], 3, 1, 7, True, unused=1),
    "L63-k2-F130-shared-strided-odd": Case([5, 0, 58], 4, 2, 130, True, row_pad=3, unused=1),
    "L65-k3-F33-noshared-empty-docs": Case([0, 30, 1, 34, 0], 5, 3, 33, False, unused=1),
    "L65-k2-F130-bf16-strided-aligned": Case([64, 1], 4, 2, 130, True, "bfloat16", row_pad=14),
    "L63-k2-F24-extra-rows": Case([63], 4, 2, 24, True, extra_rows=5, unused=2),
    "L20-k4-F16-shared": Case([7, 13], 4, 4, 16, True),
    "L33-k2-F1030-bf16-noshared": Case([1, 32], 3, 2, 1030, False, "bfloat16"),
    "L0-empty-docs": Case([0, 0], 4, 2, 9, True),
}
# (document lengths, E, k, shared, unused memories, favourite memory or None, block_tokens, block_docs)
PLAN_CASES = {
    "E4k2-shared-empty-and-single-docs": ([9, 0, 1, 13, 0], 4, 2, True, 0, None, None, None),
    "E4k2-noshared-carry-over-blocks": ([1, 0, 40, 1, 30, 0], 4, 2, False, 0, None, 16, 2),
    "E5k3-shared-unused-memory": ([0, 17, 2, 50], 5, 3, True, 1, None, 16, 4),
    "E3k1-skewed-one-unused": ([0, 1, 44, 0, 19], 3, 1, True, 1, 0, 16, None),
    "E4k4-shared": ([3, 30], 4, 4, True, 0, None, None, None),
    "E1k1-shared": ([5, 0, 6], 1, 1, True, 0, None, None, None),
    "L1-E4k2": ([1], 4, 2, True, 1, None, None, None),
    "L0-E4k2": ([0, 0, 0], 4, 2, True, 0, None, None, None),
}
TOL = {"float32": 1e-5, "bfloat16": 1e-2}
OUTPUTS = ("gather", "gather_dx", "select", "select_dtable", "combine", "combine_do", "combine_dweight")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _routing(docs: list[int], num_memories: int, topk: int, unused: int, favourite: int | None,
             gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_idx [L, k] long, distinct per token, never the last `unused` memories; cu_seqlens int32 [N+1])."""
    scores = torch.rand(sum(docs), num_memories, generator=gen)
    if unused:
        scores[:, num_memories - unused:] -= 2.0
    if favourite is not None:
        scores[:, favourite] += 0.9
    cu = torch.tensor([0] + docs, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return scores.topk(topk, -1).indices, cu


def _rows(num_rows: int, F: int, pad: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Random [num_rows, F]; with pad, a column slice (offset pad) of a [num_rows, F + pad] tensor."""
    wide = torch.randn(num_rows, F + pad, generator=gen).to(dtype)
    return wide[:, pad:]


class Batch(NamedTuple):
    x: torch.Tensor  # [L, F]
    table: torch.Tensor  # [L*S + extra, F]
    o: torch.Tensor  # [R + extra, F]
    weight: torch.Tensor  # [L, k] fp32
    row_token: torch.Tensor  # [R]
    src: torch.Tensor  # [R]
    dest: torch.Tensor  # [L, k]
    grads: dict  # upstream gradients of gather [R, F], select [R, F], combine [L, F]


def _batch(case: Case, seed: int) -> Batch:
    """Fresh random inputs (leaves requiring grad) on the plan of a random routing."""
    gen = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, case.dtype)
    topk_idx, cu = _routing(case.docs, case.num_memories, case.topk, case.unused, None, gen)
    plan = build_stream_plan(topk_idx, cu, case.num_memories, case.shared)
    L, F, S = topk_idx.shape[0], case.features, plan.num_streams
    R = plan.src.numel()
    x = _rows(L, F, case.row_pad, dtype, gen).requires_grad_()
    table = _rows(L * S + case.extra_rows, F, case.row_pad, dtype, gen).requires_grad_()
    o = _rows(R + case.extra_rows, F, case.row_pad, dtype, gen).requires_grad_()
    weight = torch.randn(L, case.topk, generator=gen).softmax(-1).requires_grad_()
    grads = {"gather": _rows(R, F, case.row_pad, dtype, gen), "select": _rows(R, F, case.row_pad, dtype, gen),
             "combine": _rows(L, F, case.row_pad, dtype, gen)}
    return Batch(x, table, o, weight, plan.src // S, plan.src, plan.dest, grads)


def _reference(b: Batch, shared: bool) -> dict[str, torch.Tensor]:
    """Every output and gradient by plain indexing and autograd in float64."""
    L, k = b.dest.shape
    x, table, o, weight = (t.detach().double().requires_grad_() for t in (b.x, b.table, b.o, b.weight))
    g = {name: t.double() for name, t in b.grads.items()}
    gathered = x[b.row_token]
    selected = table[b.src]
    combined = (o[b.dest] * weight[..., None]).sum(1)
    if shared:
        combined = combined + o[L * k:L * (k + 1)]
    (dx,) = torch.autograd.grad(gathered, x, g["gather"])
    (dtable,) = torch.autograd.grad(selected, table, g["select"])
    do, dweight = torch.autograd.grad(combined, (o, weight), g["combine"])
    return dict(zip(OUTPUTS, (gathered, dx, selected, dtable, combined, do, dweight)))


def _run_case(case: Case, backend: str, seed: int = 0) -> dict[str, float]:
    """Relative error of every output and gradient of the three ops (through autograd) vs the reference."""
    b = _batch(case, seed)
    gathered = gather_tokens(b.x, b.row_token, b.dest, case.shared, backend=backend)
    selected = select_rows(b.table, b.src, backend=backend)
    combined = combine_rows(b.o, b.dest, b.weight, case.shared, backend=backend)
    (dx,) = torch.autograd.grad(gathered, b.x, b.grads["gather"])
    (dtable,) = torch.autograd.grad(selected, b.table, b.grads["select"])
    do, dweight = torch.autograd.grad(combined, (b.o, b.weight), b.grads["combine"])
    got = dict(zip(OUTPUTS, (gathered, dx, selected, dtable, combined, do, dweight)))
    ref = _reference(b, case.shared)
    errs = {name: _rel(got[name], ref[name]) for name in OUTPUTS}
    errs["dtypes_ok"] = float(gathered.dtype == selected.dtype == combined.dtype == b.x.dtype
                              and dweight.dtype == torch.float32)
    return errs


def _run_poisoned_launchers(case: Case, tile: tuple[int, int, int], seed: int = 3) -> dict[str, float]:
    """The launchers called directly on NaN-filled outputs with a small tile (several row programs and
    feature blocks): every element must be written and match the reference."""
    from mom_train.kernels.routing.permute_kernels import combine_rows_bwd, gather_rows, weighted_row_sum

    b = _batch(case, seed)
    ref = _reference(b, case.shared)
    x, table, o, weight = (t.detach() for t in (b.x, b.table, b.o, b.weight))
    dest, F = b.dest.contiguous(), x.shape[1]
    nan = float("nan")
    gathered = gather_rows(x, b.row_token, torch.full((b.row_token.numel(), F), nan, dtype=x.dtype), tile=tile)
    selected = gather_rows(table, b.src, torch.full((b.src.numel(), F), nan, dtype=x.dtype), tile=tile)
    dx = weighted_row_sum(b.grads["gather"], dest, None, case.shared, torch.full_like(x, nan), tile=tile)
    inverse = torch.full((table.shape[0],), -1, dtype=torch.long)
    inverse[b.src] = torch.arange(b.src.numel())
    dtable = gather_rows(b.grads["select"], inverse, torch.full(table.shape, nan, dtype=x.dtype),
                         allow_missing=True, tile=tile)
    combined = weighted_row_sum(o, dest, weight, case.shared, torch.full((dest.shape[0], F), nan, dtype=x.dtype),
                                tile=tile)
    do = torch.full(o.shape, nan, dtype=x.dtype)
    dweight = torch.full(dest.shape, nan)
    combine_rows_bwd(o, dest, weight, b.grads["combine"], case.shared, do, dweight, tile=tile)
    got = dict(zip(OUTPUTS, (gathered, dx, selected, dtable, combined, do, dweight)))
    return {name: _rel(got[name], ref[name]) for name in OUTPUTS}


# launcher cases: (case, tile = (rows per program, BLOCK_F, warps)); R = L*k (+L) so do starts as NaN
LAUNCH_CASES = {
    "poisoned-F70-5-feature-blocks": (Case([1, 0, 20, 9], 4, 2, 70, True, row_pad=6, unused=1), (4, 16, 4)),
    "poisoned-k3-noshared-F33": (Case([13, 0, 4], 4, 3, 33, False), (8, 32, 4)),
}


def _run_plan_case(docs, num_memories, topk, shared, unused, favourite, block_tokens, block_docs,
                   seed: int = 5) -> dict[str, bool]:
    """Exact equality of the Triton plan (fresh outputs, and a direct launch on sentinel-filled outputs)."""
    from mom_train.kernels.routing.plan_kernel import launch_stream_plan

    gen = torch.Generator().manual_seed(seed)
    topk_idx, cu = _routing(docs, num_memories, topk, unused, favourite, gen)
    ref = build_stream_plan(topk_idx, cu, num_memories, shared)
    plan = build_stream_plan_triton(topk_idx, cu, num_memories, shared, block_tokens, block_docs)
    out = {"src": torch.equal(plan.src, ref.src), "dest": torch.equal(plan.dest, ref.dest),
           "cu_seqlens": torch.equal(plan.cu_seqlens, ref.cu_seqlens) and plan.cu_seqlens.dtype == torch.int32,
           "num_streams": plan.num_streams == ref.num_streams}
    if topk_idx.shape[0]:
        src, dest, cu_out = (torch.full_like(t, -7) for t in (ref.src, ref.dest, ref.cu_seqlens))
        launch_stream_plan(topk_idx, cu.long(), num_memories, shared, src, dest, cu_out, block_tokens, block_docs)
        out["poisoned"] = (torch.equal(src, ref.src) and torch.equal(dest, ref.dest)
                           and torch.equal(cu_out, ref.cu_seqlens))
    return out


@pytest.fixture(scope="module")
def interpreter_results() -> dict:
    return run_in_interpreter(__file__)


def _check_errors(name: str, errs: dict[str, float], dtype: str) -> None:
    assert errs.pop("dtypes_ok", 1.0) == 1.0, f"{name}: output dtypes differ from the inputs'"
    bad = {k: v for k, v in errs.items() if not v <= TOL[dtype]}
    assert not bad, f"{name}: relative errors above {TOL[dtype]}: {bad}"


@pytest.mark.parametrize("name", list(CASES) + list(LAUNCH_CASES))
def test_triton_permutations_match_indexing(interpreter_results, name):
    dtype = CASES[name].dtype if name in CASES else LAUNCH_CASES[name][0].dtype
    _check_errors(name, dict(interpreter_results["permute"][name]), dtype)


@pytest.mark.parametrize("name", list(PLAN_CASES))
def test_triton_plan_equals_build_stream_plan(interpreter_results, name):
    flags = interpreter_results["plan"][name]
    assert all(flags.values()), f"{name}: differs from build_stream_plan in {[k for k, v in flags.items() if not v]}"


@pytest.mark.parametrize("name", list(CASES))
def test_torch_permutations_match_indexing(name):
    _check_errors(name, _run_case(CASES[name], "torch"), CASES[name].dtype)


def test_auto_backend_on_cpu_is_torch():
    case = CASES["L63-k2-F130-shared-strided-odd"]
    _check_errors("auto", _run_case(case, "auto", seed=7), case.dtype)
    gen = torch.Generator().manual_seed(0)
    topk_idx, cu = _routing([4, 0, 9], 4, 2, 0, None, gen)
    plan, ref = build_stream_plan_auto(topk_idx, cu, 4, True), build_stream_plan(topk_idx, cu, 4, True)
    assert torch.equal(plan.src, ref.src) and torch.equal(plan.cu_seqlens, ref.cu_seqlens)


def test_torch_backend_is_shape_only_on_meta():
    """Meta tensors have no data: a host sync or a data-dependent shape would raise."""
    L, k, F = 12, 2, 10
    dest = torch.empty(L, k, dtype=torch.long, device="meta")
    rows = torch.empty(L * (k + 1), dtype=torch.long, device="meta")
    x = torch.empty(L, F, device="meta", requires_grad=True)
    o = torch.empty(L * (k + 1), F, device="meta", requires_grad=True)
    w = torch.empty(L, k, device="meta", requires_grad=True)
    y = combine_rows(o, dest, w, True, "torch") + gather_tokens(x, rows, dest, True, "torch")[:L]
    y = y + select_rows(o, rows, "torch")[:L]
    do, dw, dx = torch.autograd.grad(y.sum(), (o, w, x))
    assert do.shape == o.shape and dw.shape == w.shape and dx.shape == x.shape


def test_bad_inputs_name_the_problem():
    x, dest = torch.randn(4, 3), torch.zeros(4, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="backend"):
        gather_tokens(x, torch.zeros(12, dtype=torch.long), dest, True, backend="cuda")
    with pytest.raises(ValueError, match="row_token"):
        gather_tokens(x, torch.zeros(8, dtype=torch.long), dest, True)
    with pytest.raises(ValueError, match="rows"):
        combine_rows(torch.randn(8, 3), dest, torch.ones(4, 2), True)
    with pytest.raises(ValueError, match="weight"):
        combine_rows(torch.randn(12, 3), dest, torch.ones(4, 3), True)


if __name__ == "__main__":
    # child process (TRITON_INTERPRET=1): one JSON line of results per case
    torch.set_num_threads(1)
    torch.manual_seed(0)
    permute = {name: _run_case(case, "triton", seed=i) for i, (name, case) in enumerate(CASES.items())}
    permute.update({name: _run_poisoned_launchers(*case) for name, case in LAUNCH_CASES.items()})
    plan = {name: _run_plan_case(*case) for name, case in PLAN_CASES.items()}
    print(json.dumps({"permute": permute, "plan": plan}))
