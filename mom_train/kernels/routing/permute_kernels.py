"""Triton kernels of the routing permutations: row gathers and per-token weighted row sums.

Every kernel takes [rows, F] operands with a free row stride and unit column stride; a program owns ROWS
rows (or tokens) and loops over the features in blocks of BLOCK_F. Row strides and F are passed divided by
the largest power of two (<= 16) that divides them (the *_ALIGN constexprs) so the compiler can prove that
rows start on aligned addresses and that the feature mask is constant over aligned groups, and vectorise
the loads and stores (e.g. 8 bf16 per access for F = 2056). Row offsets are int64.

    gather     out[r] = table[index[r]]  (rows with index -1 become zeros when ALLOW_MISSING)
    row sum    out[t] = sum_j weight[t, j] * rows[dest[t, j]] (+ rows[L*k + t] when SHARED), fp32 accumulation
    combine backward   drows[dest[t, j]] = weight[t, j] * dy[t], drows[L*k + t] = dy[t],
                       dweight[t, j] = <rows[dest[t, j]], dy[t]>
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gather_rows_kernel(table, index, out, num_rows, F_units, table_stride, out_stride,
                        TABLE_ALIGN: tl.constexpr, OUT_ALIGN: tl.constexpr, ALLOW_MISSING: tl.constexpr,
                        F_ALIGN: tl.constexpr, ROWS: tl.constexpr, BLOCK_F: tl.constexpr):
    F = F_units * F_ALIGN
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    row_ok = rows < num_rows
    picked = tl.load(index + rows, mask=row_ok, other=0).to(tl.int64)
    read_ok = row_ok
    if ALLOW_MISSING:
        read_ok = row_ok & (picked >= 0)
    table_rows = table + picked[:, None] * (table_stride * TABLE_ALIGN)
    out_rows = out + rows[:, None] * (out_stride * OUT_ALIGN)
    for f0 in range(0, F, BLOCK_F):
        cols = f0 + tl.arange(0, BLOCK_F)
        col_ok = (cols < F)[None, :]
        values = tl.load(table_rows + cols[None, :], mask=read_ok[:, None] & col_ok, other=0.0)
        tl.store(out_rows + cols[None, :], values, mask=row_ok[:, None] & col_ok)


@triton.jit
def _weighted_row_sum_kernel(rows_in, dest, weight, out, L, F_units, in_stride, out_stride,
                             K: tl.constexpr, SHARED: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                             IN_ALIGN: tl.constexpr, OUT_ALIGN: tl.constexpr,
                             F_ALIGN: tl.constexpr, ROWS: tl.constexpr, BLOCK_F: tl.constexpr):
    F = F_units * F_ALIGN
    tokens = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    token_ok = tokens < L
    in_stride = in_stride * IN_ALIGN
    shared_rows = rows_in + (L * K + tokens)[:, None] * in_stride
    out_rows = out + tokens[:, None] * (out_stride * OUT_ALIGN)
    for f0 in range(0, F, BLOCK_F):
        cols = f0 + tl.arange(0, BLOCK_F)
        mask = token_ok[:, None] & (cols < F)[None, :]
        acc = tl.zeros([ROWS, BLOCK_F], dtype=tl.float32)
        for j in tl.static_range(K):
            row = tl.load(dest + tokens * K + j, mask=token_ok, other=0).to(tl.int64)
            values = tl.load(rows_in + row[:, None] * in_stride + cols[None, :], mask=mask, other=0.0)
            values = values.to(tl.float32)
            if HAS_WEIGHT:
                w = tl.load(weight + tokens * K + j, mask=token_ok, other=0.0).to(tl.float32)
                values = values * w[:, None]
            acc += values
        if SHARED:
            acc += tl.load(shared_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(out_rows + cols[None, :], acc.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _combine_bwd_kernel(rows_in, dest, weight, dy, drows, dweight, L, F_units, in_stride, dy_stride,
                        drows_stride,
                        K: tl.constexpr, KP: tl.constexpr, SHARED: tl.constexpr,
                        WANT_DROWS: tl.constexpr, WANT_DWEIGHT: tl.constexpr,
                        IN_ALIGN: tl.constexpr, DY_ALIGN: tl.constexpr, DROWS_ALIGN: tl.constexpr,
                        F_ALIGN: tl.constexpr, ROWS: tl.constexpr, BLOCK_F: tl.constexpr):
    F = F_units * F_ALIGN
    tokens = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    token_ok = tokens < L
    choice = tl.arange(0, KP)
    in_stride = in_stride * IN_ALIGN
    drows_stride = drows_stride * DROWS_ALIGN
    dy_rows = dy + tokens[:, None] * (dy_stride * DY_ALIGN)
    shared_rows = drows + (L * K + tokens)[:, None] * drows_stride
    dweight_acc = tl.zeros([ROWS, KP], dtype=tl.float32)
    for f0 in range(0, F, BLOCK_F):
        cols = f0 + tl.arange(0, BLOCK_F)
        mask = token_ok[:, None] & (cols < F)[None, :]
        grad = tl.load(dy_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        for j in tl.static_range(K):
            row = tl.load(dest + tokens * K + j, mask=token_ok, other=0).to(tl.int64)
            if WANT_DROWS:
                w = tl.load(weight + tokens * K + j, mask=token_ok, other=0.0).to(tl.float32)
                tl.store(drows + row[:, None] * drows_stride + cols[None, :],
                         (grad * w[:, None]).to(drows.dtype.element_ty), mask=mask)
            if WANT_DWEIGHT:
                values = tl.load(rows_in + row[:, None] * in_stride + cols[None, :], mask=mask, other=0.0)
                partial = tl.sum(values.to(tl.float32) * grad, axis=1)  # [ROWS]
                dweight_acc += tl.where(choice[None, :] == j, partial[:, None], 0.0)
        if SHARED:
            if WANT_DROWS:
                tl.store(shared_rows + cols[None, :], grad.to(drows.dtype.element_ty), mask=mask)
    if WANT_DWEIGHT:
        tl.store(dweight + tokens[:, None] * K + choice[None, :], dweight_acc,
                 mask=token_ok[:, None] & (choice < K)[None, :])


def power_of_two_divisor(n: int) -> int:
    """The largest power of two (<= 16) dividing n (16 for n = 0)."""
    align = 16
    while align > 1 and n % align:
        align //= 2
    return align


def row_align(*tensors: torch.Tensor) -> tuple[int, ...]:
    """Per tensor, the largest power of two (<= 16) dividing its row stride."""
    return tuple(power_of_two_divisor(t.stride(0)) for t in tensors)


def default_tile(F: int) -> tuple[int, int, int]:
    """(rows per program, BLOCK_F, warps): the widest power-of-two feature block up to 1024 that pads F by at
    most 1/8 (e.g. 1024 for F = 1024, 256 for F = 2056), and about 4096 elements per tile."""
    block_f = min(1024, triton.next_power_of_2(max(F, 1)))
    while block_f > 16 and triton.cdiv(F, block_f) * block_f * 8 > F * 9:
        block_f //= 2
    rows = max(1, min(64, 4096 // block_f))
    return rows, block_f, 4


def gather_rows(table: torch.Tensor, index: torch.Tensor, out: torch.Tensor, allow_missing: bool = False,
                tile: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Fill out [R, F] with out[r] = table[index[r]]; table [M, F]; index [R] long (contiguous). With
    allow_missing, index -1 writes a zero row."""
    num_rows, F = out.shape
    if num_rows == 0 or F == 0:
        return out
    rows, block_f, warps = tile or default_tile(F)
    f_align = power_of_two_divisor(F)
    table_align, out_align = row_align(table, out)
    _gather_rows_kernel[(triton.cdiv(num_rows, rows),)](
        table, index, out, num_rows, F // f_align, table.stride(0) // table_align, out.stride(0) // out_align,
        TABLE_ALIGN=table_align, OUT_ALIGN=out_align, ALLOW_MISSING=allow_missing, F_ALIGN=f_align,
        ROWS=rows, BLOCK_F=block_f, num_warps=warps)
    return out


def weighted_row_sum(rows_in: torch.Tensor, dest: torch.Tensor, weight: torch.Tensor | None, shared: bool,
                     out: torch.Tensor, tile: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Fill out [L, F] with out[t] = sum_j weight[t, j] * rows_in[dest[t, j]] (weight 1 when None) plus
    rows_in[L*k + t] when shared, accumulated in fp32; rows_in [R, F]; dest [L, k] long and weight [L, k]
    contiguous."""
    L, F = out.shape
    if L == 0 or F == 0:
        return out
    rows, block_f, warps = tile or default_tile(F)
    f_align = power_of_two_divisor(F)
    in_align, out_align = row_align(rows_in, out)
    _weighted_row_sum_kernel[(triton.cdiv(L, rows),)](
        rows_in, dest, weight if weight is not None else dest, out, L, F // f_align,
        rows_in.stride(0) // in_align, out.stride(0) // out_align,
        K=dest.shape[1], SHARED=shared, HAS_WEIGHT=weight is not None, IN_ALIGN=in_align, OUT_ALIGN=out_align,
        F_ALIGN=f_align, ROWS=rows, BLOCK_F=block_f, num_warps=warps)
    return out


def combine_rows_bwd(rows_in: torch.Tensor, dest: torch.Tensor, weight: torch.Tensor, dy: torch.Tensor,
                     shared: bool, drows: torch.Tensor | None, dweight: torch.Tensor | None,
                     tile: tuple[int, int, int] | None = None) -> None:
    """Backward of `weighted_row_sum` with weights: fill drows [R, F] at the L*k (+L) referenced rows
    (drows[dest[t, j]] = weight[t, j] * dy[t], drows[L*k + t] = dy[t]) and dweight [L, k] fp32
    (contiguous) with <rows_in[dest[t, j]], dy[t]>. Either output may be None (not computed)."""
    L, F = dy.shape
    if L == 0 or (drows is None and dweight is None):
        return
    if F == 0:
        if dweight is not None:
            dweight.zero_()
        return
    rows, block_f, warps = tile or default_tile(F)
    f_align = power_of_two_divisor(F)
    drows_arg = drows if drows is not None else dy
    in_align, dy_align, drows_align = row_align(rows_in, dy, drows_arg)
    _combine_bwd_kernel[(triton.cdiv(L, rows),)](
        rows_in, dest, weight, dy, drows_arg, dweight if dweight is not None else weight, L, F // f_align,
        rows_in.stride(0) // in_align, dy.stride(0) // dy_align, drows_arg.stride(0) // drows_align,
        K=dest.shape[1], KP=triton.next_power_of_2(dest.shape[1]), SHARED=shared,
        WANT_DROWS=drows is not None, WANT_DWEIGHT=dweight is not None,
        IN_ALIGN=in_align, DY_ALIGN=dy_align, DROWS_ALIGN=drows_align, F_ALIGN=f_align, ROWS=rows, BLOCK_F=block_f,
        num_warps=warps)
