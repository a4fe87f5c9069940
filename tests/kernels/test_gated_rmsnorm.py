"""Gated RMSNorm: Triton kernel (under TRITON_INTERPRET=1, in a subprocess) vs the naive definition.

The interpreter must be on before triton is imported, so the kernel cases run once in a child process (this
file run as a script) that prints relative errors as JSON; each parametrised test checks its own case.
"""
from __future__ import annotations

import json

import pytest
import torch

from mom_train.kernels.gated_rmsnorm import gated_rmsnorm, naive_gated_rmsnorm
from tests.kernels.interpreter import run_in_interpreter

# name: (shape of x and gate, dtype, strided gate)
CASES = {
    "B2-T5-H3-D16": ((2, 5, 3, 16), "float32", False),
    "T63-H2-D24-not-pow2": ((1, 63, 2, 24), "float32", False),
    "rows65-D8": ((65, 8), "float32", False),
    "rows1-D32": ((1, 32), "float32", False),
    "strided-gate": ((3, 7, 2, 16), "float32", True),
    "bf16-T65-H2-D64": ((1, 65, 2, 64), "bfloat16", False),
}
TOL = {"float32": 1e-5, "bfloat16": 2e-2}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _inputs(shape, dtype: torch.dtype, strided_gate: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * 3).to(dtype).requires_grad_()
    if strided_gate:
        # every other column of a wider projection output
        gate = torch.randn(*shape[:-1], 2 * shape[-1], generator=gen).to(dtype)[..., ::2].requires_grad_()
    else:
        gate = torch.randn(shape, generator=gen).to(dtype).requires_grad_()
    weight = (1 + 0.5 * torch.randn(shape[-1], generator=gen)).requires_grad_()
    return x, gate, weight


def _run_case(shape, dtype_name, strided_gate) -> dict[str, float]:
    dtype = getattr(torch, dtype_name)
    x, gate, weight = _inputs(shape, dtype, strided_gate)
    y = gated_rmsnorm(x, gate, weight, eps=1e-6)
    ref = naive_gated_rmsnorm(x, gate, weight, eps=1e-6)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    grads = torch.autograd.grad((y.float() * dy).sum(), (x, gate, weight))
    ref_grads = torch.autograd.grad((ref.float() * dy).sum(), (x, gate, weight))
    errs = {"y": _rel(y, ref), "dtype_mismatch": float(y.dtype != dtype)}
    errs.update({name: _rel(g, r) for name, g, r in zip(("dx", "dgate", "dweight"), grads, ref_grads)})
    return errs


def _run_poisoned_case() -> dict[str, float]:
    """Launchers called directly on NaN-filled outputs; 3 backward programs loop over 9 row blocks."""
    from mom_train.kernels.gated_rmsnorm.fused import gated_rmsnorm_bwd, gated_rmsnorm_fwd

    x, gate, weight = _inputs((130, 256), torch.float32, False, seed=3)
    x, gate, weight = x.detach(), gate.detach(), weight.detach()
    y = torch.full_like(x, float("nan"))
    rstd = torch.full((130,), float("nan"))
    gated_rmsnorm_fwd(x, gate, weight, 1e-6, y, rstd)
    dy = torch.randn_like(x)
    dx, dgate = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
    dx, dgate, dweight = gated_rmsnorm_bwd(x, gate, weight, rstd, dy, dx, dgate, num_programs=3)
    leaves = [t.clone().requires_grad_() for t in (x, gate, weight)]
    ref = naive_gated_rmsnorm(*leaves)
    ref_grads = torch.autograd.grad((ref * dy).sum(), leaves)
    return {"y": _rel(y, ref), "dx": _rel(dx, ref_grads[0]), "dgate": _rel(dgate, ref_grads[1]),
            "dweight": _rel(dweight, ref_grads[2])}


@pytest.fixture(scope="module")
def interpreter_results() -> dict:
    return run_in_interpreter(__file__)


@pytest.mark.parametrize("name", list(CASES) + ["poisoned-3-programs"])
def test_triton_matches_naive(interpreter_results, name):
    errs = interpreter_results[name]
    tol = TOL[CASES[name][1]] if name in CASES else TOL["float32"]
    bad = {k: v for k, v in errs.items() if not v <= tol}
    assert not bad, f"{name}: relative errors above {tol}: {bad}"


def test_naive_matches_model_norm():
    from mom_train.model.norm import GatedRMSNorm

    norm = GatedRMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    x, gate, _ = _inputs((2, 5, 3, 16), torch.float32, False)
    assert _rel(norm(x, gate), naive_gated_rmsnorm(x, gate, norm.weight)) < 1e-6


def test_bad_inputs_name_the_problem():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="gate"):
        gated_rmsnorm(x, torch.randn(4, 7), torch.ones(8))
    with pytest.raises(ValueError, match="weight"):
        gated_rmsnorm(x, torch.randn(4, 8), torch.ones(7))


if __name__ == "__main__":
    # child process (TRITON_INTERPRET=1): one JSON line of relative errors per case
    results = {name: _run_case(*case) for name, case in CASES.items()}
    results["poisoned-3-programs"] = _run_poisoned_case()
    print(json.dumps(results))
