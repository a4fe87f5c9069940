"""Gradients that count every parameter once: the tensor-parallel sum of partial gradients, the global norm
and clipping.

Under tensor parallelism a parameter is one of
- sharded (`tp_shard`): each tp rank holds different entries; its squares are summed over tp for the norm;
- partial (`tp_partial`): replicated, but each rank's gradient covers only its heads or its token shard; the
  gradients are summed over tp (then equal on every rank) and counted once;
- replicated: the same gradient on every rank (RMSNorm weights without sequence parallelism); counted once.
With tp = 1 every parameter is simply counted once, as torch's clip_grad_norm_ does.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from mom_train.parallel.dims import ParallelDims


def is_sharded(p: torch.Tensor) -> bool:
    return getattr(p, "tp_shard", None) is not None


def is_partial(p: torch.Tensor) -> bool:
    return bool(getattr(p, "tp_partial", False))


def order_for_flat_buffer(params: list[nn.Parameter]) -> list[nn.Parameter]:
    """params as [sharded | partial | replicated], each in the given order, so one slice of a flat gradient
    buffer holds every partial gradient (one all-reduce) and one the squares summed over tp."""
    return ([p for p in params if is_sharded(p)] + [p for p in params if is_partial(p)]
            + [p for p in params if not is_sharded(p) and not is_partial(p)])


def flat_slices(params: list[nn.Parameter]) -> tuple[slice, slice]:
    """(sharded, partial) element ranges of a flat buffer laid out by `order_for_flat_buffer`."""
    num_sharded = sum(p.numel() for p in params if is_sharded(p))
    num_partial = sum(p.numel() for p in params if is_partial(p))
    return slice(0, num_sharded), slice(num_sharded, num_sharded + num_partial)


def sum_partial_grads(params: list[nn.Parameter], dims: ParallelDims) -> None:
    """Sum the gradients of the partial parameters over the tp group (one all-reduce of their concatenation)."""
    grads = [p.grad for p in params if is_partial(p) and p.grad is not None]
    if dims.tp_size == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=dims.tp_group)
    torch._foreach_copy_(grads, [part.view_as(g) for part, g in zip(flat.split([g.numel() for g in grads]), grads)])


def _squares(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    if not grads:
        return torch.zeros((), device=device, dtype=torch.float32)
    return torch.stack(torch._foreach_norm(grads, 2.0)).float().pow(2).sum()


def grad_norm(params: list[nn.Parameter], dims: ParallelDims) -> torch.Tensor:
    """Global L2 norm of the gradients (fp32 device scalar, inf/NaN when one is not finite); no host sync."""
    sharded = [p.grad for p in params if p.grad is not None and is_sharded(p)]
    others = [p.grad for p in params if p.grad is not None and not is_sharded(p)]
    squares = _squares(sharded, dims.device)
    if dims.tp_size > 1:
        dist.all_reduce(squares, group=dims.tp_group)
    return (squares + _squares(others, dims.device)).sqrt()


def flat_grad_norm(buffer: torch.Tensor, sharded: slice, dims: ParallelDims) -> torch.Tensor:
    """`grad_norm` of a flat gradient buffer whose `sharded` slice holds the sharded parameters."""
    squares = buffer[sharded].float().pow(2).sum()
    if dims.tp_size > 1:
        dist.all_reduce(squares, group=dims.tp_group)
    rest = buffer[sharded.stop:].float().pow(2).sum()
    return (squares + rest).sqrt()


def clip_coefficient(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """min(1, max_norm / (norm + 1e-6)) as torch's clip_grad_norm_ computes it (device scalar)."""
    return torch.clamp(max_norm / (norm + 1e-6), max=1.0)


def clip_grads_(params: list[nn.Parameter], max_norm: float, dims: ParallelDims) -> torch.Tensor:
    """Scale the gradients to global norm <= max_norm; return the norm before clipping. With tp = 1 this is
    torch's clip_grad_norm_ (same arithmetic)."""
    if dims.tp_size == 1:
        return nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    norm = grad_norm(params, dims)
    grads = [p.grad for p in params if p.grad is not None]
    if max_norm < math.inf and grads:
        torch._foreach_mul_(grads, clip_coefficient(norm, max_norm).to(grads[0].dtype))
    return norm
