"""Residual add + RMSNorm: Triton kernel (under TRITON_INTERPRET=1, in a subprocess) and the torch fallback vs
the naive definition in float64.

The interpreter must be on before triton is imported, so the kernel cases run once in a child process (this
file run as a script) that prints, per case, {quantity: [relative error, tolerance]} as JSON; each
parametrised test checks its own case. The torch fallback runs the same cases in this process.
"""
from __future__ import annotations

import json

import pytest
import torch

from mom_train.kernels.fused_norm import add_rms_norm, naive_add_rms_norm
from tests.kernels.interpreter import run_in_interpreter

# name: (shape of x, x dtype, residual dtype (None: no residual), out_dtype (None: default), loss on)
CASES = {
    "rows1-D130-fp32": ((1, 130), "float32", "float32", None, "both"),
    "rows63-D130-bf16x-fp32res-bf16out": ((63, 130), "bfloat16", "float32", "bfloat16", "both"),
    "rows65-D1024-no-residual-fp32": ((65, 1024), "float32", None, None, "both"),
    "B3-T21-D130-no-residual-bf16": ((3, 21, 130), "bfloat16", None, None, "both"),
    "B2-T33-D1024-bf16x-fp32res": ((2, 33, 1024), "bfloat16", "float32", None, "both"),
    "rows65-D130-loss-on-y-only": ((65, 130), "bfloat16", "float32", "bfloat16", "y"),
    "rows65-D130-loss-on-residual-only": ((65, 130), "float32", "float32", None, "residual"),
    "rows3-D8192-bf16out": ((3, 8192), "float32", "float32", "bfloat16", "both"),
}
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
EPS = 1e-6


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _check(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> list[float]:
    """[relative error, tolerance]; a wrong dtype counts as an infinite error."""
    err = _rel(got, ref) if got.dtype == dtype else float("inf")
    return [err, TOL[dtype]]


def _inputs(shape, x_dtype: torch.dtype, residual_dtype: torch.dtype | None, seed: int):
    """Leaves x [shape], residual [shape] or None, weight [D] fp32 (all requiring grad)."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * 3).to(x_dtype).requires_grad_()
    residual = None
    if residual_dtype is not None:
        residual = (torch.randn(shape, generator=gen) * 5).to(residual_dtype).requires_grad_()
    weight = (1 + 0.5 * torch.randn(shape[-1], generator=gen)).requires_grad_()
    return x, residual, weight


def _float64_leaves(*tensors):
    return [None if t is None else t.detach().double().requires_grad_() for t in tensors]


def _loss(y, new_residual, dy, dres, loss_on: str) -> torch.Tensor:
    """sum(y * dy) + sum(new_residual * dres) in float64, or only one of the two terms."""
    terms = []
    if loss_on in ("both", "y"):
        terms.append((y.double() * dy).sum())
    if loss_on in ("both", "residual"):
        terms.append((new_residual.double() * dres).sum())
    return sum(terms)


def _run_case(shape, x_name, residual_name, out_name, loss_on, backend: str, seed: int = 0) -> dict:
    x_dtype = getattr(torch, x_name)
    residual_dtype = getattr(torch, residual_name) if residual_name else None
    out_dtype = getattr(torch, out_name) if out_name else None
    x, residual, weight = _inputs(shape, x_dtype, residual_dtype, seed)
    stored_dtype = residual_dtype or x_dtype
    y, new_residual = add_rms_norm(x, residual, weight, EPS, out_dtype=out_dtype, backend=backend)
    leaves64 = _float64_leaves(x, residual, weight)
    ref_y, ref_res = naive_add_rms_norm(*leaves64, EPS)
    gen = torch.Generator().manual_seed(seed + 1000)
    # upstream gradients hold values the outputs' dtypes represent exactly
    dy = torch.randn(shape, generator=gen).to(y.dtype).double()
    dres = torch.randn(shape, generator=gen).to(new_residual.dtype).double()
    leaves = [t for t in (x, residual, weight) if t is not None]
    grads = torch.autograd.grad(_loss(y, new_residual, dy, dres, loss_on), leaves,
                                allow_unused=True, materialize_grads=True)
    ref_grads = torch.autograd.grad(_loss(ref_y, ref_res, dy, dres, loss_on), [t for t in leaves64 if t is not None],
                                    allow_unused=True, materialize_grads=True)
    errs = {"y": _check(y, ref_y, out_dtype or stored_dtype),
            "new_residual": _check(new_residual, ref_res, stored_dtype),
            "dx": _check(grads[0], ref_grads[0], x_dtype),
            "dweight": _check(grads[-1], ref_grads[-1], torch.float32)}
    if residual is not None:
        errs["dresidual"] = _check(grads[1], ref_grads[1], residual_dtype)
    return errs


def _run_poisoned_case() -> dict:
    """Launchers called directly on NaN-filled outputs (bf16 x, fp32 residual, odd M and D); 3 backward
    programs loop over 17 row blocks."""
    from mom_train.kernels.fused_norm.fused import add_rms_norm_bwd, add_rms_norm_fwd

    M, D = 131, 130
    x, residual, weight = (t.detach() for t in _inputs((M, D), torch.bfloat16, torch.float32, seed=7))
    y = torch.full((M, D), float("nan"), dtype=torch.bfloat16)
    new_residual = torch.full((M, D), float("nan"))
    rstd = torch.full((M,), float("nan"))
    add_rms_norm_fwd(x, residual, weight, EPS, y, new_residual, rstd)
    dy, dres = torch.randn(M, D).to(torch.bfloat16), torch.randn(M, D)
    dx = torch.full((M, D), float("nan"), dtype=torch.bfloat16)
    dresidual = torch.full((M, D), float("nan"))
    dx, dresidual, dweight = add_rms_norm_bwd(new_residual, weight, rstd, dy, dres, dx, dresidual, num_programs=3)
    leaves64 = _float64_leaves(x, residual, weight)
    ref_y, ref_res = naive_add_rms_norm(*leaves64, EPS)
    ref_rstd = torch.rsqrt(ref_res.pow(2).mean(-1) + EPS)
    ref_grads = torch.autograd.grad(_loss(ref_y, ref_res, dy.double(), dres.double(), "both"), leaves64)
    return {"y": _check(y, ref_y, torch.bfloat16), "new_residual": _check(new_residual, ref_res, torch.float32),
            "rstd": _check(rstd, ref_rstd, torch.float32), "dx": _check(dx, ref_grads[0], torch.bfloat16),
            "dresidual": _check(dresidual, ref_grads[1], torch.float32),
            "dweight": _check(dweight, ref_grads[2], torch.float32)}


def _saved_tensors_check(backend: str) -> dict:
    """What the autograd graph keeps: exactly new_residual (fp32), rstd [M] fp32 and weight."""
    x, residual, weight = _inputs((5, 130), torch.bfloat16, torch.float32, seed=11)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y, new_residual = add_rms_norm(x, residual, weight, EPS, out_dtype=torch.bfloat16, backend=backend)
    ptrs = sorted(t.data_ptr() for t in saved)
    rstd_like = [t for t in saved if t.shape == (5,) and t.dtype == torch.float32]
    ok = (len(saved) == 3 and len(rstd_like) == 1
          and ptrs == sorted([new_residual.data_ptr(), weight.data_ptr(), rstd_like[0].data_ptr()]))
    return {"saves_new_residual_rstd_weight_only": [float(not ok), 0.0]}


@pytest.fixture(scope="module")
def interpreter_results() -> dict:
    return run_in_interpreter(__file__)


def _assert_within(name: str, errs: dict) -> None:
    bad = {k: v for k, v in errs.items() if not v[0] <= v[1]}
    assert not bad, f"{name}: [relative error, tolerance] out of bounds: {bad}"


@pytest.mark.parametrize("name", list(CASES) + ["poisoned-3-programs", "saved-tensors"])
def test_triton_matches_naive(interpreter_results, name):
    _assert_within(name, interpreter_results[name])


@pytest.mark.parametrize("name", list(CASES))
def test_torch_fallback_matches_naive(name):
    _assert_within(name, _run_case(*CASES[name], backend="torch", seed=list(CASES).index(name)))


def test_auto_backend_on_cpu_is_torch():
    x, residual, weight = _inputs((4, 16), torch.float32, torch.float32, seed=3)
    auto = add_rms_norm(x, residual, weight, backend="auto")
    ref = add_rms_norm(x, residual, weight, backend="torch")
    assert all(torch.equal(a, b) for a, b in zip(auto, ref))


def test_naive_matches_model_norm():
    from mom_train.model.norm import RMSNorm

    norm = RMSNorm(130, eps=EPS)
    with torch.no_grad():
        norm.weight.normal_()
    x, residual, _ = _inputs((2, 5, 130), torch.float32, torch.float32, seed=5)
    y, new_residual = naive_add_rms_norm(x, residual, norm.weight, EPS)
    assert _rel(new_residual, x + residual) == 0.0
    assert _rel(y, norm(x + residual)) < 1e-6


def test_bad_inputs_name_the_problem(monkeypatch):
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="residual"):
        add_rms_norm(x, torch.randn(4, 7), torch.ones(8))
    with pytest.raises(ValueError, match="weight"):
        add_rms_norm(x, None, torch.ones(7))
    with pytest.raises(ValueError, match="backend"):
        add_rms_norm(x, None, torch.ones(8), backend="cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="CUDA"):
        add_rms_norm(x, None, torch.ones(8), backend="triton")


if __name__ == "__main__":
    # child process (TRITON_INTERPRET=1): one JSON line of [relative error, tolerance] per case and quantity
    results = {name: _run_case(*case, backend="triton", seed=i) for i, (name, case) in enumerate(CASES.items())}
    results["poisoned-3-programs"] = _run_poisoned_case()
    results["saved-tensors"] = _saved_tensors_check("triton")
    print(json.dumps(results))
