"""Triton gated RMSNorm over rows of [M, D] (forward and backward), fp32 math.

Forward saves the inverse rms per row. Backward writes dx and dgate per row and accumulates dweight in a
two-stage reduction: every program sums its rows into one fp32 partial [D], torch adds the partials.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mom_train.kernels.fused_norm.fused import reduction_programs

# backward launch by element size: about `elements` values per block, num_warps, programs_per_sm programs
# per multiprocessor in the grid-stride loop. From scripts/tune_norms.py on an H200 at M=65536, D=256:
# bf16 209.6 -> 89.3 us, fp32 134.8 -> 98.4 us
BWD_LAUNCH = {2: dict(elements=8192, num_warps=4, programs_per_sm=2),
              4: dict(elements=2048, num_warps=4, programs_per_sm=8)}


@triton.jit
def _gated_rmsnorm_fwd_kernel(x, gate, weight, y, rstd, M, D, eps, stride_x, stride_g, stride_y,
                              BM: tl.constexpr, BD: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.arange(0, BD)
    mrow = rows < M
    mcol = cols < D
    mask = mrow[:, None] & mcol[None, :]
    r64 = rows.to(tl.int64)[:, None]
    xv = tl.load(x + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    gv = tl.load(gate + r64 * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    wv = tl.load(weight + cols, mask=mcol, other=0.0).to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(xv * xv, axis=1) / D + eps)  # [BM]
    out = xv * r[:, None] * wv[None, :] * (gv * tl.sigmoid(gv))
    tl.store(y + r64 * stride_y + cols[None, :], out.to(y.dtype.element_ty), mask=mask)
    tl.store(rstd + rows, r, mask=mrow)


@triton.jit
def _gated_rmsnorm_bwd_kernel(x, gate, weight, rstd, dy, dx, dgate, dw_part, M, D,
                              stride_x, stride_g, stride_dy, stride_dx, stride_dg,
                              BM: tl.constexpr, BD: tl.constexpr):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    cols = tl.arange(0, BD)
    mcol = cols < D
    wv = tl.load(weight + cols, mask=mcol, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BD], dtype=tl.float32)
    for blk in range(pid, tl.cdiv(M, BM), num_programs):
        rows = blk * BM + tl.arange(0, BM)
        mrow = rows < M
        mask = mrow[:, None] & mcol[None, :]
        r64 = rows.to(tl.int64)[:, None]
        xv = tl.load(x + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        gv = tl.load(gate + r64 * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dyv = tl.load(dy + r64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        r = tl.load(rstd + rows, mask=mrow, other=0.0)
        xhat = xv * r[:, None]
        sig = tl.sigmoid(gv)
        silu = gv * sig
        # y = xhat * w * silu(g)
        dgv = dyv * xhat * wv[None, :] * sig * (1.0 + gv * (1.0 - sig))
        dw_acc += tl.sum(dyv * xhat * silu, axis=0)
        dxhat = dyv * wv[None, :] * silu
        dxv = r[:, None] * (dxhat - xhat * (tl.sum(dxhat * xhat, axis=1) / D)[:, None])
        tl.store(dx + r64 * stride_dx + cols[None, :], dxv.to(dx.dtype.element_ty), mask=mask)
        tl.store(dgate + r64 * stride_dg + cols[None, :], dgv.to(dgate.dtype.element_ty), mask=mask)
    tl.store(dw_part + pid.to(tl.int64) * D + cols, dw_acc, mask=mcol)


def _block_rows(D: int, elements: int) -> tuple[int, int]:
    """Rows per block (about `elements` per block) and the padded row width."""
    BD = triton.next_power_of_2(D)
    return max(1, min(64, elements // BD)), BD


def gated_rmsnorm_fwd(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float,
                      y: torch.Tensor, rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill y [M, D] and rstd fp32 [M] from x, gate [M, D] (unit column stride) and weight [D]."""
    M, D = x.shape
    BM, BD = _block_rows(D, 4096)
    _gated_rmsnorm_fwd_kernel[(triton.cdiv(M, BM),)](
        x, gate, weight, y, rstd, M, D, eps, x.stride(0), gate.stride(0), y.stride(0),
        BM=BM, BD=BD, num_warps=8)
    return y, rstd


def gated_rmsnorm_bwd(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                      dy: torch.Tensor, dx: torch.Tensor, dgate: torch.Tensor,
                      num_programs: int | None = None, config: dict | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fill dx, dgate [M, D]; return (dx, dgate, dweight [D] fp32). config overrides the launch (elements per
    block, num_warps, programs_per_sm) for tuning."""
    M, D = x.shape
    cfg = {**BWD_LAUNCH[4 if x.element_size() >= 4 else 2], **(config or {})}
    BM, BD = _block_rows(D, cfg["elements"])
    num_programs = num_programs or reduction_programs(x.device, cfg["programs_per_sm"])
    num_programs = max(1, min(num_programs, triton.cdiv(M, BM)))
    dw_part = torch.empty(num_programs, D, device=x.device, dtype=torch.float32)
    _gated_rmsnorm_bwd_kernel[(num_programs,)](
        x, gate, weight, rstd, dy, dx, dgate, dw_part, M, D,
        x.stride(0), gate.stride(0), dy.stride(0), dx.stride(0), dgate.stride(0),
        BM=BM, BD=BD, num_warps=cfg["num_warps"])
    return dx, dgate, dw_part.sum(0)


class _GatedRMSNormFunction(torch.autograd.Function):
    """y [M, D] = rmsnorm(x) * weight * silu(gate); differentiable in x, gate and weight."""

    @staticmethod
    def forward(ctx, x, gate, weight, eps):
        y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
        rstd = torch.empty(x.shape[0], device=x.device, dtype=torch.float32)
        gated_rmsnorm_fwd(x, gate, weight, eps, y, rstd)
        ctx.save_for_backward(x, gate, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, gate, weight, rstd = ctx.saved_tensors
        if dy.stride(-1) != 1:
            dy = dy.contiguous()
        dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
        dgate = torch.empty(gate.shape, device=gate.device, dtype=gate.dtype)
        dx, dgate, dweight = gated_rmsnorm_bwd(x, gate, weight, rstd, dy, dx, dgate)
        return dx, dgate, dweight.to(weight.dtype), None


def gated_rmsnorm_triton(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x, gate [M, D] -> y [M, D] in x's dtype (differentiable)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if gate.stride(-1) != 1:
        gate = gate.contiguous()
    return _GatedRMSNormFunction.apply(x, gate, weight.contiguous(), eps)
