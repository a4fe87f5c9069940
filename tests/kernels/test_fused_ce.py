"""Fused linear + cross entropy vs F.cross_entropy(reduction="sum") on the full logits, value and gradients.

The torch backend runs in this process; the Triton softmax-gradient kernel runs under TRITON_INTERPRET=1 in
a child process (this file run as a script) that prints relative errors as JSON.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from mom_train.kernels.fused_ce import fused_linear_cross_entropy, fused_loss_fn
from tests.kernels.interpreter import run_in_interpreter

# name: (N, D, V, chunk_rows, fraction of ignored targets)
CASES = {
    "N37-chunk8-uneven": (37, 16, 50, 8, 0.2),
    "N64-one-chunk": (64, 24, 97, 256, 0.0),
    "N1": (1, 8, 33, 8, 0.0),
    "N63-all-but-one-ignored": (63, 8, 40, 16, 0.99),
}
TRITON_CASES = {"N37-V50-chunk8": (37, 16, 50, 8, 0.2), "N9-V5000-two-vocab-blocks": (9, 8, 5000, 4, 0.3)}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _inputs(N, D, V, ignored, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(N, D, generator=gen) * 2).requires_grad_()
    weight = torch.randn(V, D, generator=gen).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=gen)
    drop = torch.rand(N, generator=gen) < ignored
    drop[0] = False
    return hidden, weight, targets.masked_fill(drop, -100)


def _compare(N, D, V, chunk_rows, ignored, backend, grad_scale=1.7) -> dict[str, float]:
    hidden, weight, targets = _inputs(N, D, V, ignored)
    loss, num_valid = fused_linear_cross_entropy(hidden, weight, targets, chunk_rows=chunk_rows, backend=backend)
    dh, dw = torch.autograd.grad(loss * grad_scale, (hidden, weight))
    ref = F.cross_entropy((hidden @ weight.t()).float(), targets, reduction="sum")
    ref_dh, ref_dw = torch.autograd.grad(ref * grad_scale, (hidden, weight))
    count_ok = num_valid.dtype == torch.long and int(num_valid) == int((targets != -100).sum())
    return {"loss": _rel(loss, ref), "dhidden": _rel(dh, ref_dh), "dweight": _rel(dw, ref_dw),
            "num_valid_mismatch": float(not count_ok), "loss_dtype_mismatch": float(loss.dtype != torch.float32)}


@pytest.mark.parametrize("name", list(CASES))
def test_torch_backend_matches_full_logits(name):
    errs = _compare(*CASES[name], backend="torch")
    bad = {k: v for k, v in errs.items() if not v <= 1e-5}
    assert not bad, f"{name}: relative errors above 1e-5: {bad}"


def test_autocast_bf16_matches_full_logits():
    """Under autocast the logits are bf16 (like F.linear would give), the softmax fp32, grads in fp32 params."""
    hidden, weight, targets = _inputs(40, 32, 64, 0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = fused_linear_cross_entropy(hidden, weight, targets, chunk_rows=16, backend="torch")
        ref = F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")
    grads = torch.autograd.grad(loss, (hidden, weight))
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    assert _rel(loss, ref) < 1e-4
    assert grads[0].dtype == torch.float32 and grads[1].dtype == torch.float32
    assert _rel(grads[0], ref_grads[0]) < 2e-2 and _rel(grads[1], ref_grads[1]) < 2e-2


def test_loss_fn_seam_and_no_grad():
    hidden, weight, targets = _inputs(2 * 9, 8, 30, 0.2)
    loss, logits = fused_loss_fn(hidden.view(2, 9, 8), weight, targets.view(2, 9))
    ref = F.cross_entropy((hidden @ weight.t()).float(), targets, reduction="sum")
    assert logits is None and _rel(loss, ref) < 1e-5
    with torch.no_grad():
        loss2, _ = fused_linear_cross_entropy(hidden, weight, targets, chunk_rows=4, backend="torch")
    assert _rel(loss2, ref) < 1e-5


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="flatten"):
        fused_linear_cross_entropy(torch.randn(2, 3, 4), torch.randn(5, 4), torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match="targets"):
        fused_linear_cross_entropy(torch.randn(6, 4), torch.randn(5, 4), torch.zeros(6, dtype=torch.int32))


@pytest.fixture(scope="module")
def interpreter_results() -> dict:
    return run_in_interpreter(__file__)


@pytest.mark.parametrize("name", list(TRITON_CASES))
def test_triton_softmax_grad_matches_full_logits(interpreter_results, name):
    errs = interpreter_results[name]
    bad = {k: v for k, v in errs.items() if not v <= 1e-5}
    assert not bad, f"{name}: relative errors above 1e-5: {bad}"


if __name__ == "__main__":
    # child process (TRITON_INTERPRET=1): one JSON line of relative errors per case
    print(json.dumps({name: _compare(*case, backend="triton") for name, case in TRITON_CASES.items()}))
