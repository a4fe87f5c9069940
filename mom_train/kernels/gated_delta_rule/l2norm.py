"""Row-wise L2 normalisation in Triton, y = x * rsqrt(sum(x^2) + 1e-6), with its backward.

Used by the chunk kernels for use_qk_l2norm_in_kernel. x: [R, D] rows, D <= 256.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# rows per program
BR = 16


@triton.jit
def _l2norm_fwd_kernel(x, y, rstd, R, D: tl.constexpr, DP: tl.constexpr, BR: tl.constexpr):
    o_r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    o_d = tl.arange(0, DP)
    m = (o_r < R)[:, None] & (o_d < D)[None, :]
    b_x = tl.load(x + o_r[:, None] * D + o_d[None, :], mask=m, other=0.).to(tl.float32)
    b_r = tl.rsqrt(tl.sum(b_x * b_x, 1) + 1e-6)
    tl.store(y + o_r[:, None] * D + o_d[None, :], (b_x * b_r[:, None]).to(y.dtype.element_ty), mask=m)
    tl.store(rstd + o_r, b_r, mask=o_r < R)


@triton.jit
def _l2norm_bwd_kernel(x, rstd, dy, dx, R, D: tl.constexpr, DP: tl.constexpr, BR: tl.constexpr,
                       NORMED: tl.constexpr):
    """dx = r (dy - y (y.dy)); x holds y itself when NORMED, else the input (y = x r recomputed in fp32)."""
    o_r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    o_d = tl.arange(0, DP)
    m = (o_r < R)[:, None] & (o_d < D)[None, :]
    b_x = tl.load(x + o_r[:, None] * D + o_d[None, :], mask=m, other=0.).to(tl.float32)
    b_dy = tl.load(dy + o_r[:, None] * D + o_d[None, :], mask=m, other=0.).to(tl.float32)
    b_r = tl.load(rstd + o_r, mask=o_r < R, other=0.)
    if NORMED:
        b_y = b_x
    else:
        b_y = b_x * b_r[:, None]
    b_dx = b_r[:, None] * (b_dy - b_y * tl.sum(b_y * b_dy, 1)[:, None])
    tl.store(dx + o_r[:, None] * D + o_d[None, :], b_dx.to(dx.dtype.element_ty), mask=m)


def l2norm_fwd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] contiguous -> (y like x, rstd [prod(...)] fp32)."""
    D = x.shape[-1]
    R = x.numel() // D
    y = torch.empty_like(x)
    rstd = torch.empty(R, device=x.device, dtype=torch.float32)
    _l2norm_fwd_kernel[(triton.cdiv(R, BR),)](x, y, rstd, R, D=D, DP=triton.next_power_of_2(D), BR=BR)
    return y, rstd


def l2norm_bwd(x: torch.Tensor, rstd: torch.Tensor, dy: torch.Tensor, normed: bool = False) -> torch.Tensor:
    """Gradient w.r.t. the input (in x's dtype) given dy w.r.t. y = l2norm(input); dy any float dtype, same
    shape. x is the input, or the output y itself when normed=True (then the input need not be kept)."""
    D = x.shape[-1]
    R = x.numel() // D
    dx = torch.empty_like(x)
    _l2norm_bwd_kernel[(triton.cdiv(R, BR),)](x, rstd, dy, dx, R, D=D, DP=triton.next_power_of_2(D), BR=BR,
                                                 NORMED=normed)
    return dx
