"""Triton SwiGLU over [N, I] (forward and backward, one launch each), fp32 math.

Every [N, I] operand has unit column stride and its own row stride, so gate and up may be the two column
halves of one [N, 2I] projection output. Each program handles a BM x BN tile; backward recomputes
sigmoid(gate) from the saved inputs instead of keeping silu(gate) or the product.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _swiglu_fwd_kernel(gate, up, y, N, I, stride_g, stride_u, stride_y, BM: tl.constexpr, BN: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    mask = (rows < N)[:, None] & (cols < I)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    gv = tl.load(gate + r64 * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    uv = tl.load(up + r64 * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    out = gv * tl.sigmoid(gv) * uv
    tl.store(y + r64 * stride_y + cols[None, :], out.to(y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(gate, up, dy, dgate, dup, N, I, stride_g, stride_u, stride_dy, stride_dg, stride_du,
                       BM: tl.constexpr, BN: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    mask = (rows < N)[:, None] & (cols < I)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    gv = tl.load(gate + r64 * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    uv = tl.load(up + r64 * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dyv = tl.load(dy + r64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gv)
    silu = gv * sig
    dgv = dyv * uv * sig * (1.0 + gv * (1.0 - sig))
    tl.store(dgate + r64 * stride_dg + cols[None, :], dgv.to(dgate.dtype.element_ty), mask=mask)
    tl.store(dup + r64 * stride_du + cols[None, :], (dyv * silu).to(dup.dtype.element_ty), mask=mask)


def _tile(I: int) -> tuple[int, int]:
    """(BM rows, BN columns) per program: up to 1024 columns, about 4096 elements."""
    BN = min(triton.next_power_of_2(max(I, 1)), 1024)
    return max(1, min(64, 4096 // BN)), BN


def _row_stride(t: torch.Tensor) -> int:
    """Row stride of an [N, I] tensor with unit column stride (any layout when I <= 1)."""
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        raise ValueError(f"swiglu (triton): expected unit column stride, got strides {t.stride()}")
    return t.stride(0)


def swiglu_fwd(gate: torch.Tensor, up: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Fill y [N, I] with silu(gate) * up from gate, up [N, I] (unit column stride, any row strides)."""
    N, I = gate.shape
    BM, BN = _tile(I)
    if N > 0 and I > 0:
        _swiglu_fwd_kernel[(triton.cdiv(N, BM), triton.cdiv(I, BN))](
            gate, up, y, N, I, _row_stride(gate), _row_stride(up), _row_stride(y), BM=BM, BN=BN, num_warps=8)
    return y


def swiglu_bwd(gate: torch.Tensor, up: torch.Tensor, dy: torch.Tensor, dgate: torch.Tensor,
               dup: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill dgate, dup [N, I] from gate, up, dy [N, I] (unit column stride, any row strides); returns them."""
    N, I = gate.shape
    BM, BN = _tile(I)
    if N > 0 and I > 0:
        _swiglu_bwd_kernel[(triton.cdiv(N, BM), triton.cdiv(I, BN))](
            gate, up, dy, dgate, dup, N, I, _row_stride(gate), _row_stride(up), _row_stride(dy),
            _row_stride(dgate), _row_stride(dup), BM=BM, BN=BN, num_warps=8)
    return dgate, dup
