"""Differentiable permutations between per-token rows and the memory-major buffer of a `StreamPlan`.

Each op runs a Triton kernel for CUDA tensors and plain torch otherwise (`backend` "auto"), or the one named
("triton" | "torch"); both backends compute the same thing, forward and backward, without atomics (so the
gradients are deterministic) and without a host sync. Inputs may have any row stride; a last dim with a
stride other than 1 is copied first. L tokens, k routed slots per token, R buffer rows (L*k, plus L shared
rows when `shared`), F features.
"""
from __future__ import annotations

import torch

from mom_train.kernels.backend import resolve_backend

def use_triton(backend: str, tensor: torch.Tensor, op: str) -> bool:
    """Whether `op` runs the Triton kernel (see mom_train.kernels.backend)."""
    return resolve_backend(op, backend, tensor) == "triton"


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """t [N, F] with a unit last-dim stride (a copy only when needed)."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _num_buffer_rows(dest: torch.Tensor, shared: bool) -> int:
    """R = L*k (+L): the buffer rows that dest [L, k] and the shared rows reference."""
    L, k = dest.shape
    return L * (k + int(shared))


# --- plain torch implementations (any device, including meta) ---------------------------------------------

def _gather_rows_torch(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """out [R, F] = table[index] for table [M, F], index [R]."""
    return table.index_select(0, index)


def _weighted_row_sum_torch(rows: torch.Tensor, dest: torch.Tensor, weight: torch.Tensor | None, shared: bool,
                            out_dtype: torch.dtype) -> torch.Tensor:
    """out [L, F] = sum_j weight[t, j] * rows[dest[t, j]] (+ rows[L*k + t]) in fp32, cast to out_dtype."""
    L, k = dest.shape
    picked = rows.index_select(0, dest.reshape(-1)).view(L, k, rows.shape[1]).float()  # [L, k, F]
    if weight is not None:
        picked = picked * weight.float()[:, :, None]
    out = picked.sum(1)
    if shared:
        out = out + rows[L * k:L * (k + 1)].float()
    return out.to(out_dtype)


def _combine_rows_bwd_torch(o: torch.Tensor, dest: torch.Tensor, weight: torch.Tensor, dy: torch.Tensor,
                            shared: bool, want_do: bool, want_dweight: bool
                            ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(do [R, F] in o's dtype, dweight [L, k] fp32) of `combine_rows`; None where not wanted."""
    L, k = dest.shape
    grad = dy.float()
    do = dweight = None
    if want_do:
        do = _empty_or_zeros(o, dest, shared)
        routed = (weight.float()[:, :, None] * grad[:, None, :]).to(o.dtype)  # [L, k, F]
        do.index_copy_(0, dest.reshape(-1), routed.reshape(L * k, o.shape[1]))
        if shared:
            do[L * k:L * (k + 1)] = dy.to(o.dtype)
    if want_dweight:
        picked = o.index_select(0, dest.reshape(-1)).view(L, k, o.shape[1]).float()
        dweight = (picked * grad[:, None, :]).sum(-1)
    return do, dweight


def _empty_or_zeros(o: torch.Tensor, dest: torch.Tensor, shared: bool) -> torch.Tensor:
    """The gradient buffer [R, F] of o: left empty when every row gets written (R = L*k (+L)), else zeros."""
    if o.shape[0] == _num_buffer_rows(dest, shared):
        return torch.empty(o.shape, dtype=o.dtype, device=o.device)
    return torch.zeros(o.shape, dtype=o.dtype, device=o.device)


# --- dispatch to one backend -----------------------------------------------------------------------------

def _gather_rows(table: torch.Tensor, index: torch.Tensor, triton_path: bool) -> torch.Tensor:
    """out [R, F] = table[index]."""
    if not triton_path:
        return _gather_rows_torch(table, index)
    from mom_train.kernels.routing.permute_kernels import gather_rows

    out = torch.empty(index.shape[0], table.shape[1], dtype=table.dtype, device=table.device)
    return gather_rows(table, index.contiguous(), out)


def _weighted_row_sum(rows: torch.Tensor, dest: torch.Tensor, weight: torch.Tensor | None, shared: bool,
                      out_dtype: torch.dtype, triton_path: bool) -> torch.Tensor:
    """out [L, F] = sum_j weight[t, j] * rows[dest[t, j]] (+ rows[L*k + t]), fp32 accumulation."""
    if not triton_path:
        return _weighted_row_sum_torch(rows, dest, weight, shared, out_dtype)
    from mom_train.kernels.routing.permute_kernels import weighted_row_sum

    out = torch.empty(dest.shape[0], rows.shape[1], dtype=out_dtype, device=rows.device)
    weight = weight.contiguous() if weight is not None else None
    return weighted_row_sum(rows, dest.contiguous(), weight, shared, out)


def _scatter_rows_with_zeros(grad: torch.Tensor, index: torch.Tensor, num_rows: int,
                             triton_path: bool) -> torch.Tensor:
    """out [M, F]: out[index[r]] = grad[r] (index unique), zeros in the rows no index names."""
    if not triton_path:
        out = grad.new_zeros(num_rows, grad.shape[1])
        return out.index_copy_(0, index, grad)
    from mom_train.kernels.routing.permute_kernels import gather_rows

    # the inverse map (row of grad feeding each output row, -1 for none) turns the scatter into a gather
    # that writes every output row once
    inverse = torch.full((num_rows,), -1, dtype=torch.long, device=grad.device)
    inverse.scatter_(0, index, torch.arange(index.shape[0], device=grad.device))
    out = torch.empty(num_rows, grad.shape[1], dtype=grad.dtype, device=grad.device)
    return gather_rows(grad, inverse, out, allow_missing=True)


def _combine_rows_bwd(o: torch.Tensor, dest: torch.Tensor, weight: torch.Tensor, dy: torch.Tensor, shared: bool,
                      want_do: bool, want_dweight: bool, triton_path: bool
                      ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(do [R, F], dweight [L, k] fp32) of `combine_rows`."""
    if not triton_path:
        return _combine_rows_bwd_torch(o, dest, weight, dy, shared, want_do, want_dweight)
    from mom_train.kernels.routing.permute_kernels import combine_rows_bwd

    do = _empty_or_zeros(o, dest, shared) if want_do else None
    dweight = torch.empty(dest.shape, dtype=torch.float32, device=o.device) if want_dweight else None
    combine_rows_bwd(o, dest.contiguous(), weight.contiguous(), dy, shared, do, dweight)
    return do, dweight


# --- autograd ops ----------------------------------------------------------------------------------------

class _GatherTokens(torch.autograd.Function):
    """out [R, F] = x[row_token]; dx[t] = sum of the gradients of token t's buffer rows (dest[t], shared)."""

    @staticmethod
    def forward(ctx, x, row_token, dest, shared, triton_path):
        ctx.save_for_backward(dest)
        ctx.shared, ctx.triton_path, ctx.x_dtype = shared, triton_path, x.dtype
        return _gather_rows(x, row_token, triton_path)

    @staticmethod
    def backward(ctx, grad):
        (dest,) = ctx.saved_tensors
        grad = _unit_last_stride(grad)
        dx = _weighted_row_sum(grad, dest, None, ctx.shared, ctx.x_dtype, ctx.triton_path)
        return dx, None, None, None, None


class _SelectRows(torch.autograd.Function):
    """out [R, F] = table[src] with unique src; dtable = grad scattered back, zeros elsewhere."""

    @staticmethod
    def forward(ctx, table, src, triton_path):
        ctx.save_for_backward(src)
        ctx.num_rows, ctx.triton_path = table.shape[0], triton_path
        return _gather_rows(table, src, triton_path)

    @staticmethod
    def backward(ctx, grad):
        (src,) = ctx.saved_tensors
        grad = _unit_last_stride(grad)
        return _scatter_rows_with_zeros(grad, src, ctx.num_rows, ctx.triton_path), None, None


class _CombineRows(torch.autograd.Function):
    """y [L, F] = sum_j weight[t, j] * o[dest[t, j]] (+ o[L*k + t]); gradients in o and weight."""

    @staticmethod
    def forward(ctx, o, dest, weight, shared, triton_path):
        ctx.save_for_backward(o, dest, weight)
        ctx.shared, ctx.triton_path = shared, triton_path
        return _weighted_row_sum(o, dest, weight, shared, o.dtype, triton_path)

    @staticmethod
    def backward(ctx, dy):
        o, dest, weight = ctx.saved_tensors
        dy = _unit_last_stride(dy)
        want_do, want_dweight = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        do, dweight = _combine_rows_bwd(o, dest, weight, dy, ctx.shared, want_do, want_dweight, ctx.triton_path)
        if dweight is not None:
            dweight = dweight.to(weight.dtype)
        return do, None, dweight, None, None


# --- public ops ------------------------------------------------------------------------------------------

def gather_tokens(x: torch.Tensor, row_token: torch.Tensor, dest: torch.Tensor, shared: bool,
                  backend: str = "auto") -> torch.Tensor:
    """Copy every token's row into the buffer rows that hold it: out [R, F] = x[row_token].

    x [L, F]; row_token [R] long, the token of each buffer row (plan.src // S); dest [L, k] long, the buffer
    rows of each token's routed slots (plan.dest); with shared, row L*k + t also holds token t; R = L*k (+L).
    Backward: dx[t] = sum_j g[dest[t, j]] (+ g[L*k + t]), summed in fp32, in x's dtype.
    """
    L, F = x.shape
    if dest.dim() != 2 or dest.shape[0] != L:
        raise ValueError(f"gather_tokens: dest has shape {tuple(dest.shape)}, expected [L, k] with L={L}")
    if row_token.shape != (_num_buffer_rows(dest, shared),):
        raise ValueError(f"gather_tokens: row_token has shape {tuple(row_token.shape)}, expected "
                         f"[L*k (+L)] = [{_num_buffer_rows(dest, shared)}] (shared={shared})")
    triton_path = use_triton(backend, x, "gather_tokens")
    return _GatherTokens.apply(_unit_last_stride(x), row_token, dest, shared, triton_path)


def select_rows(table: torch.Tensor, src: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Pick buffer rows from a per-(token, stream) table: out [R, F] = table[src].

    table [M, F]; src [R] long with unique entries in [0, M) (plan.src). Backward: dtable [M, F] holds
    g[r] in row src[r] and zeros in the rows src never names, in table's dtype.
    """
    if src.dim() != 1:
        raise ValueError(f"select_rows: src has shape {tuple(src.shape)}, expected [R]")
    triton_path = use_triton(backend, table, "select_rows")
    return _SelectRows.apply(_unit_last_stride(table), src, triton_path)


def combine_rows(o: torch.Tensor, dest: torch.Tensor, weight: torch.Tensor, shared: bool,
                 backend: str = "auto") -> torch.Tensor:
    """Mix each token's buffer rows back into one row: y [L, F] = sum_j weight[t, j] * o[dest[t, j]]
    (+ o[L*k + t] with shared), accumulated in fp32, in o's dtype.

    o [R, F] with R >= L*k (+L); dest [L, k] long (plan.dest); weight [L, k] fp32 (router weights).
    Backward: do[dest[t, j]] = weight[t, j] * dy[t], do[L*k + t] = dy[t] (other rows zero) and
    dweight[t, j] = sum_f o[dest[t, j], f] * dy[t, f] in fp32.
    """
    if dest.dim() != 2 or weight.shape != dest.shape:
        raise ValueError(f"combine_rows: dest {tuple(dest.shape)} and weight {tuple(weight.shape)} must both be "
                         "[L, k]")
    if o.shape[0] < _num_buffer_rows(dest, shared):
        raise ValueError(f"combine_rows: o has {o.shape[0]} rows, expected at least L*k (+L) = "
                         f"{_num_buffer_rows(dest, shared)} (shared={shared})")
    triton_path = use_triton(backend, o, "combine_rows")
    return _CombineRows.apply(_unit_last_stride(o), dest, weight, shared, triton_path)
