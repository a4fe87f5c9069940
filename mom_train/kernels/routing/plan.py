"""The memory-major stream plan of `build_stream_plan` (stream_plan.py), in one Triton launch.

Same result bit for bit (src, dest, cu_seqlens), without a host sync or a data-dependent shape: the outputs
are allocated from L, k, E and N alone. Triton is imported on the first call.
"""
from __future__ import annotations

import torch

from mom_train.kernels.backend import resolve_backend
from mom_train.kernels.routing.stream_plan import StreamPlan, build_stream_plan

def build_stream_plan_triton(topk_idx: torch.Tensor, cu_seqlens: torch.Tensor, num_memories: int,
                             shared: bool, block_tokens: int | None = None,
                             block_docs: int | None = None) -> StreamPlan:
    """Memory-major varlen layout of L tokens' top-k slots (and shared rows), computed by one Triton launch.

    topk_idx [L, k] long, entries in [0, E) and distinct per token; cu_seqlens [N+1] int32/int64 document
    boundaries (0 .. L, empty documents allowed). Returns StreamPlan(src [L*k (+L)] long, dest [L, k] long,
    cu_seqlens [S*N + 1] int32, S) equal to `build_stream_plan`'s. block_tokens / block_docs: loop steps
    of the kernel (powers of two; default from L and N).
    """
    num_tokens, topk = topk_idx.shape
    num_streams = num_memories + int(shared)
    num_docs = cu_seqlens.numel() - 1
    device = topk_idx.device
    src = torch.empty(num_tokens * (topk + int(shared)), dtype=torch.long, device=device)
    dest = torch.empty(num_tokens, topk, dtype=torch.long, device=device)
    cu_out = torch.empty(num_streams * num_docs + 1, dtype=torch.int32, device=device)
    if num_tokens == 0:
        # nothing is routed: every segment is empty
        return StreamPlan(src, dest, cu_out.zero_(), num_streams)
    from mom_train.kernels.routing.plan_kernel import launch_stream_plan

    launch_stream_plan(topk_idx.contiguous(), cu_seqlens.contiguous(), num_memories, shared, src, dest, cu_out,
                       block_tokens, block_docs)
    return StreamPlan(src, dest, cu_out, num_streams)


def build_stream_plan_auto(topk_idx: torch.Tensor, cu_seqlens: torch.Tensor, num_memories: int, shared: bool,
                           backend: str = "auto") -> StreamPlan:
    """`build_stream_plan_triton` for CUDA tensors (backend "auto") or when backend is "triton"; the tensor-op
    `build_stream_plan` otherwise. Shapes as in `build_stream_plan_triton`."""
    if resolve_backend("build_stream_plan", backend, topk_idx) == "triton":
        return build_stream_plan_triton(topk_idx, cu_seqlens, num_memories, shared)
    return build_stream_plan(topk_idx, cu_seqlens, num_memories, shared)
