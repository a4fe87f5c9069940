"""SwiGLU: Triton kernels (under TRITON_INTERPRET=1, in a subprocess) and the torch fallback vs the naive
definition in float64.

The interpreter must be on before triton is imported, so the kernel cases run once in a child process (this
file run as a script) that prints, per case, {quantity: [relative error, tolerance]} as JSON; each
parametrised test checks its own case. The torch fallback runs the same cases in this process.
"""
from __future__ import annotations

import json

import pytest
import torch

from mom_train.kernels.swiglu import naive_swiglu, swiglu
from tests.kernels.interpreter import run_in_interpreter

# name: (leading shape, I, dtype, packed: gate and up are the column halves of one [..., 2I] tensor)
CASES = {
    "rows1-I130": ((1,), 130, "float32", False),
    "rows63-I130-bf16": ((63,), 130, "bfloat16", False),
    "rows65-I1024": ((65,), 1024, "float32", False),
    "rows65-I1024-packed-bf16": ((65,), 1024, "bfloat16", True),
    "B2-T33-I130-packed": ((2, 33), 130, "float32", True),
    "rows5-I1500-packed-bf16-two-column-blocks": ((5,), 1500, "bfloat16", True),
}
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _check(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> list[float]:
    """[relative error, tolerance]; a wrong dtype counts as an infinite error."""
    err = _rel(got, ref) if got.dtype == dtype else float("inf")
    return [err, TOL[dtype]]


def _inputs(lead, I: int, dtype: torch.dtype, packed: bool, seed: int):
    """(leaves, gate, up): packed -> leaves = [h [*lead, 2I]] and gate, up its column halves (row stride 2I);
    else leaves = [gate, up], each [*lead, I]."""
    gen = torch.Generator().manual_seed(seed)
    if packed:
        h = (torch.randn(*lead, 2 * I, generator=gen) * 2).to(dtype).requires_grad_()
        return [h], h[..., :I], h[..., I:]
    gate = (torch.randn(*lead, I, generator=gen) * 2).to(dtype).requires_grad_()
    up = torch.randn(*lead, I, generator=gen).to(dtype).requires_grad_()
    return [gate, up], gate, up


def _run_case(lead, I, dtype_name, packed, backend: str, seed: int = 0) -> dict:
    dtype = getattr(torch, dtype_name)
    leaves, gate, up = _inputs(lead, I, dtype, packed, seed)
    y = swiglu(gate, up, backend=backend)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    gate64, up64 = (leaves64[0][..., :I], leaves64[0][..., I:]) if packed else leaves64
    ref = naive_swiglu(gate64, up64)
    # the upstream gradient holds values y's dtype represents exactly
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 1000)).to(dtype).double()
    grads = torch.autograd.grad((y.double() * dy).sum(), leaves)
    ref_grads = torch.autograd.grad((ref * dy).sum(), leaves64)
    names = ["dh"] if packed else ["dgate", "dup"]
    errs = {"y": _check(y, ref, dtype)}
    errs.update({n: _check(g, r, dtype) for n, g, r in zip(names, grads, ref_grads)})
    return errs


def _run_poisoned_case() -> dict:
    """Launchers called directly: strided gate/up slices in, NaN-filled strided outputs (column slices of wider
    buffers) out; 10 x 2 programs. Every element must be written and nothing outside the slices."""
    from mom_train.kernels.swiglu.fused import swiglu_bwd, swiglu_fwd

    N, I = 37, 1500
    (h,), gate, up = _inputs((N,), I, torch.float32, True, seed=7)
    h, gate, up = h.detach(), gate.detach(), up.detach()
    y_buf = torch.full((N, I + 64), float("nan"))
    swiglu_fwd(gate, up, y_buf[:, 32:32 + I])
    dy = torch.randn(N, I)
    dh = torch.full((N, 2 * I), float("nan"))
    swiglu_bwd(gate, up, dy, dh[:, :I], dh[:, I:])
    h64 = h.double().requires_grad_()
    ref = naive_swiglu(h64[:, :I], h64[:, I:])
    (ref_dh,) = torch.autograd.grad((ref * dy.double()).sum(), (h64,))
    untouched = torch.cat([y_buf[:, :32], y_buf[:, 32 + I:]], 1).isnan().all()
    return {"y": _check(y_buf[:, 32:32 + I], ref, torch.float32), "dh": _check(dh, ref_dh, torch.float32),
            "wrote_outside_y_slice": [float(not untouched), 0.0]}


def _saved_tensors_check(backend: str) -> dict:
    """What the autograd graph keeps: exactly gate and up (no silu(gate), no product, no fp32 copies)."""
    leaves, gate, up = _inputs((3, 7), 130, torch.bfloat16, True, seed=11)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        swiglu(gate, up, backend=backend)
    ok = len(saved) == 2 and {t.data_ptr() for t in saved} == {gate.data_ptr(), up.data_ptr()} \
        and all(t.dtype == torch.bfloat16 for t in saved)
    return {"saves_gate_and_up_only": [float(not ok), 0.0]}


@pytest.fixture(scope="module")
def interpreter_results() -> dict:
    return run_in_interpreter(__file__)


def _assert_within(name: str, errs: dict) -> None:
    bad = {k: v for k, v in errs.items() if not v[0] <= v[1]}
    assert not bad, f"{name}: [relative error, tolerance] out of bounds: {bad}"


@pytest.mark.parametrize("name", list(CASES) + ["poisoned-strided-outputs", "saved-tensors"])
def test_triton_matches_naive(interpreter_results, name):
    _assert_within(name, interpreter_results[name])


@pytest.mark.parametrize("name", list(CASES))
def test_torch_fallback_matches_naive(name):
    _assert_within(name, _run_case(*CASES[name], backend="torch", seed=list(CASES).index(name)))


def test_torch_fallback_saves_gate_and_up_only():
    _assert_within("saved-tensors", _saved_tensors_check("torch"))


def test_auto_backend_on_cpu_is_torch():
    _, gate, up = _inputs((4,), 16, torch.float32, False, seed=3)
    assert torch.equal(swiglu(gate, up, backend="auto"), swiglu(gate, up, backend="torch"))


def test_naive_matches_model_mlp_activation():
    _, gate, up = _inputs((4,), 16, torch.float32, False, seed=5)
    assert _rel(naive_swiglu(gate, up), torch.nn.functional.silu(gate) * up) < 1e-7


def test_bad_inputs_name_the_problem(monkeypatch):
    gate = torch.randn(4, 8)
    with pytest.raises(ValueError, match="shape"):
        swiglu(gate, torch.randn(4, 7))
    with pytest.raises(ValueError, match="dtype"):
        swiglu(gate, torch.randn(4, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="backend"):
        swiglu(gate, torch.randn(4, 8), backend="cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="CUDA"):
        swiglu(gate, torch.randn(4, 8), backend="triton")


if __name__ == "__main__":
    # child process (TRITON_INTERPRET=1): one JSON line of [relative error, tolerance] per case and quantity
    results = {name: _run_case(*case, backend="triton", seed=i) for i, (name, case) in enumerate(CASES.items())}
    results["poisoned-strided-outputs"] = _run_poisoned_case()
    results["saved-tensors"] = _saved_tensors_check("triton")
    print(json.dumps(results))
