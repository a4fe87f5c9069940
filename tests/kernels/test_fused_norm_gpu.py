"""Residual add + RMSNorm and SwiGLU on a real GPU at training sizes.

Each compares the Triton kernels' outputs and every gradient with the torch versions by relative error, and
one step runs under torch.cuda.set_sync_debug_mode("error") to show the hot path has no host sync.
"""
from __future__ import annotations

import pytest
import torch

from mom_train.kernels.fused_norm import add_rms_norm
from mom_train.kernels.swiglu import swiglu

pytestmark = pytest.mark.gpu
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    assert torch.isfinite(a).all(), "non-finite values in the kernel output"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _norm_inputs(M: int, D: int, x_dtype: torch.dtype, residual_dtype: torch.dtype | None):
    """x [M, D], residual [M, D] or None, weight [D] fp32 on the GPU, all requiring grad."""
    x = (3 * torch.randn(M, D, device="cuda")).to(x_dtype).requires_grad_()
    residual = None
    if residual_dtype is not None:
        residual = (5 * torch.randn(M, D, device="cuda")).to(residual_dtype).requires_grad_()
    weight = (1 + 0.1 * torch.randn(D, device="cuda")).requires_grad_()
    return x, residual, weight


@pytest.mark.parametrize("x_dtype,residual_dtype,out_dtype",
                         [(torch.bfloat16, torch.float32, torch.bfloat16), (torch.float32, None, torch.bfloat16),
                          (torch.float32, torch.float32, None), (torch.bfloat16, None, None)],
                         ids=["bf16x-fp32res-bf16out", "embedding-fp32-bf16out", "fp32", "bf16-no-residual"])
def test_add_rms_norm_matches_torch(x_dtype, residual_dtype, out_dtype):
    torch.manual_seed(0)
    M, D = 16384, 1024
    x, residual, weight = _norm_inputs(M, D, x_dtype, residual_dtype)
    leaves = [t for t in (x, residual, weight) if t is not None]
    outs = add_rms_norm(x, residual, weight, out_dtype=out_dtype, backend="triton")
    refs = add_rms_norm(x, residual, weight, out_dtype=out_dtype, backend="torch")
    dy, dres = torch.randn_like(outs[0]), torch.randn_like(outs[1])

    def loss(y, new_residual):
        return (y.float() * dy.float()).sum() + (new_residual.float() * dres.float()).sum()

    grads = torch.autograd.grad(loss(*outs), leaves)
    ref_grads = torch.autograd.grad(loss(*refs), leaves)
    for name, got, ref in zip(("y", "new_residual"), outs, refs):
        assert got.dtype == ref.dtype and _rel(got, ref) < TOL[ref.dtype], name
    for leaf, got, ref in zip(leaves, grads, ref_grads):
        assert got.dtype == leaf.dtype and _rel(got, ref) < TOL[leaf.dtype], tuple(leaf.shape)


def test_swiglu_matches_torch_bf16_packed():
    torch.manual_seed(0)
    N, I = 16384, 2048
    h = torch.randn(N, 2 * I, device="cuda", dtype=torch.bfloat16).mul_(2).requires_grad_()
    y = swiglu(h[:, :I], h[:, I:], backend="triton")
    ref = swiglu(h[:, :I], h[:, I:], backend="torch")
    dy = torch.randn_like(y)
    (dh,) = torch.autograd.grad((y.float() * dy.float()).sum(), (h,))
    (ref_dh,) = torch.autograd.grad((ref.float() * dy.float()).sum(), (h,))
    assert y.dtype == torch.bfloat16 and _rel(y, ref) < TOL[torch.bfloat16]
    assert dh.dtype == torch.bfloat16 and _rel(dh, ref_dh) < TOL[torch.bfloat16]


def test_no_host_sync_in_norm_and_swiglu():
    M, D, I = 4096, 1024, 2048
    x, residual, weight = _norm_inputs(M, D, torch.bfloat16, torch.float32)
    h = torch.randn(M, 2 * I, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    # warm up (compilation may sync), then check a steady-state step
    for mode in ("default", "error"):
        torch.cuda.set_sync_debug_mode(mode)
        try:
            y, new_residual = add_rms_norm(x, residual, weight, out_dtype=torch.bfloat16)
            a = swiglu(h[:, :I], h[:, I:])
            loss = y.float().sum() + new_residual.sum() + a.float().sum()
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(t.grad).all() for t in (x, residual, weight, h))
