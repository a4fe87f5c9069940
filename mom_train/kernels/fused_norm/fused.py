"""Triton residual add + RMSNorm over rows of [M, D] (forward and backward), fp32 math.

Forward writes new_residual = residual + x and y = rmsnorm(new_residual) * weight in one pass and keeps the
inverse rms per row. Backward reads only new_residual and rstd (not x, residual or y): it forms
d(new_residual) = dnew_residual + rmsnorm_backward(dy) once and writes it as dx and dresidual in their own
dtypes; dweight is a two-stage reduction: every program sums its rows into one fp32 partial [D], torch adds the
partials.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# widest row one program holds in registers
MAX_D = 8192
# backward launch: about `elements` values per block, num_warps (None = by block size), programs_per_sm
# programs per multiprocessor in the grid-stride loop. From scripts/tune_norms.py on an H200 at
# M=16384, D=1024 (bf16 dy/dx, fp32 residual): 175.6 -> 88.1 us (1.5 -> 3.0 TB/s)
BWD_LAUNCH = dict(elements=4096, num_warps=4, programs_per_sm=8)


@triton.jit
def _add_rms_norm_fwd_kernel(x, residual, weight, y, new_residual, rstd, M, D, eps,
                             stride_x, stride_r, stride_y, stride_h,
                             HAS_RESIDUAL: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.arange(0, BD)
    mrow = rows < M
    mcol = cols < D
    mask = mrow[:, None] & mcol[None, :]
    r64 = rows.to(tl.int64)[:, None]
    h = tl.load(x + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        h += tl.load(residual + r64 * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    h = h.to(new_residual.dtype.element_ty)
    tl.store(new_residual + r64 * stride_h + cols[None, :], h, mask=mask)
    # normalise the stored (rounded) sum, which is what backward reads again
    hf = h.to(tl.float32)
    wv = tl.load(weight + cols, mask=mcol, other=0.0).to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(hf * hf, axis=1) / D + eps)  # [BM]
    out = hf * r[:, None] * wv[None, :]
    tl.store(y + r64 * stride_y + cols[None, :], out.to(y.dtype.element_ty), mask=mask)
    tl.store(rstd + rows, r, mask=mrow)


@triton.jit
def _add_rms_norm_bwd_kernel(h, weight, rstd, dy, dh_in, dx, dres, dw_part, M, D,
                             stride_h, stride_dy, stride_dhi, stride_dx, stride_dr,
                             HAS_DH_IN: tl.constexpr, STORE_DX: tl.constexpr, STORE_DRES: tl.constexpr,
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
        hv = tl.load(h + r64 * stride_h + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dyv = tl.load(dy + r64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        r = tl.load(rstd + rows, mask=mrow, other=0.0)
        hhat = hv * r[:, None]
        dw_acc += tl.sum(dyv * hhat, axis=0)
        dhhat = dyv * wv[None, :]
        dh = r[:, None] * (dhhat - hhat * (tl.sum(dhhat * hhat, axis=1) / D)[:, None])
        if HAS_DH_IN:
            dh += tl.load(dh_in + r64 * stride_dhi + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if STORE_DX:
            tl.store(dx + r64 * stride_dx + cols[None, :], dh.to(dx.dtype.element_ty), mask=mask)
        if STORE_DRES:
            tl.store(dres + r64 * stride_dr + cols[None, :], dh.to(dres.dtype.element_ty), mask=mask)
    tl.store(dw_part + pid.to(tl.int64) * D + cols, dw_acc, mask=mcol)


def _block_rows(D: int, elements: int) -> tuple[int, int]:
    """Rows per block (about `elements` per block, at least one row) and the padded row width."""
    if D > MAX_D:
        raise ValueError(f"add_rms_norm (triton): D={D} is wider than {MAX_D}; use backend='torch'")
    BD = triton.next_power_of_2(D)
    return max(1, min(64, elements // BD)), BD


def reduction_programs(device: torch.device, per_sm: int) -> int:
    """Programs of a grid-stride row loop with a per-program partial reduction: per_sm per multiprocessor
    (4 SMs' worth off CUDA, so the interpreter runs few programs)."""
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return per_sm * num_sms


def _num_warps(BM: int, BD: int) -> int:
    return 16 if BM * BD >= 8192 else 8


def _row_stride(t: torch.Tensor) -> int:
    """Row stride of a [M, D] tensor with unit column stride (any value when M <= 1)."""
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        raise ValueError(f"add_rms_norm (triton): expected unit column stride, got strides {t.stride()}")
    return t.stride(0)


def add_rms_norm_fwd(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                     y: torch.Tensor, new_residual: torch.Tensor,
                     rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fill y [M, D], new_residual [M, D] and rstd fp32 [M] from x [M, D], residual [M, D] or None and
    weight [D]; [M, D] tensors need unit column stride. Returns (y, new_residual, rstd)."""
    M, D = x.shape
    BM, BD = _block_rows(D, 4096)
    if M > 0:
        has_residual = residual is not None
        res = residual if has_residual else x
        _add_rms_norm_fwd_kernel[(triton.cdiv(M, BM),)](
            x, res, weight, y, new_residual, rstd, M, D, eps,
            _row_stride(x), _row_stride(res), _row_stride(y), _row_stride(new_residual),
            HAS_RESIDUAL=has_residual, BM=BM, BD=BD, num_warps=_num_warps(BM, BD))
    return y, new_residual, rstd


def add_rms_norm_bwd(new_residual: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, dy: torch.Tensor,
                     dnew_residual: torch.Tensor | None, dx: torch.Tensor | None, dresidual: torch.Tensor | None,
                     num_programs: int | None = None, config: dict | None = None,
                     ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """From new_residual [M, D], rstd fp32 [M], dy [M, D] and dnew_residual [M, D] (None = zero), fill dx and
    dresidual [M, D] (each skipped when None) with d(new_residual) in their dtypes.
    Returns (dx, dresidual, dweight [D] fp32). config overrides the launch (elements per block, num_warps,
    programs_per_sm) for tuning."""
    M, D = new_residual.shape
    cfg = {**BWD_LAUNCH, **(config or {})}
    BM, BD = _block_rows(D, cfg["elements"])
    num_warps = cfg["num_warps"] or _num_warps(BM, BD)
    num_programs = num_programs or reduction_programs(new_residual.device, cfg["programs_per_sm"])
    num_programs = max(1, min(num_programs, triton.cdiv(M, BM)))
    dw_part = torch.empty(num_programs, D, device=new_residual.device, dtype=torch.float32)
    # unused pointers get a valid tensor; the constexpr flags keep them unread and unwritten
    dh_in = dnew_residual if dnew_residual is not None else dy
    dx_arg = dx if dx is not None else dy
    dres_arg = dresidual if dresidual is not None else dy
    _add_rms_norm_bwd_kernel[(num_programs,)](
        new_residual, weight, rstd, dy, dh_in, dx_arg, dres_arg, dw_part, M, D,
        _row_stride(new_residual), _row_stride(dy), _row_stride(dh_in), _row_stride(dx_arg), _row_stride(dres_arg),
        HAS_DH_IN=dnew_residual is not None, STORE_DX=dx is not None, STORE_DRES=dresidual is not None,
        BM=BM, BD=BD, num_warps=num_warps)
    return dx, dresidual, dw_part.sum(0)


def _unit_stride(t: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


class _AddRMSNormFunction(torch.autograd.Function):
    """(y, new_residual) [M, D] = (rmsnorm(residual + x) * weight, residual + x); differentiable in x, residual
    and weight, with gradients from both outputs. Saves new_residual, rstd [M] and weight only."""

    @staticmethod
    def forward(ctx, x, residual, weight, eps, out_dtype):
        residual_dtype = residual.dtype if residual is not None else x.dtype
        y = torch.empty(x.shape, device=x.device, dtype=out_dtype)
        new_residual = torch.empty(x.shape, device=x.device, dtype=residual_dtype)
        rstd = torch.empty(x.shape[0], device=x.device, dtype=torch.float32)
        add_rms_norm_fwd(x, residual, weight, eps, y, new_residual, rstd)
        ctx.save_for_backward(new_residual, rstd, weight)
        ctx.x_dtype, ctx.residual_dtype = x.dtype, residual_dtype
        ctx.set_materialize_grads(False)
        return y, new_residual

    @staticmethod
    def backward(ctx, dy, dnew_residual):
        new_residual, rstd, weight = ctx.saved_tensors
        if dy is None and dnew_residual is None:
            return None, None, None, None, None
        if dy is None:
            dy = torch.zeros(new_residual.shape, device=new_residual.device, dtype=torch.float32)
        dy, dnew_residual = _unit_stride(dy), _unit_stride(dnew_residual)
        shape, device = new_residual.shape, new_residual.device
        dx = torch.empty(shape, device=device, dtype=ctx.x_dtype) if ctx.needs_input_grad[0] else None
        dres = torch.empty(shape, device=device, dtype=ctx.residual_dtype) if ctx.needs_input_grad[1] else None
        dx, dres, dweight = add_rms_norm_bwd(new_residual, weight, rstd, dy, dnew_residual, dx, dres)
        dweight = dweight.to(weight.dtype) if ctx.needs_input_grad[2] else None
        return dx, dres, dweight, None, None


def add_rms_norm_triton(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                        out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual (or None) [M, D]; weight [D] -> (y [M, D] in out_dtype, new_residual [M, D]) (differentiable)."""
    return _AddRMSNormFunction.apply(_unit_stride(x), _unit_stride(residual), weight.contiguous(), eps, out_dtype)
