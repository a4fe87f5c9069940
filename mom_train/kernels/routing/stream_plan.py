"""The sync-free memory-major stream layout of the MoM fast path, as tensor ops (the definition that the
Triton plan kernel reproduces bit for bit).

The fast MoM path lays every (memory, document) stream, plus one shared-memory stream per document, into one
packed buffer with its own cu_seqlens, so one short-conv call and one gated-delta-rule call serve them all:

    buffer rows  = [memory 0: doc 0 | doc 1 | ... | memory 1: doc 0 | ... | shared: doc 0 | doc 1 | ...]
    segments     = S * N, S = E (+1 with shared memory), N documents; empty segments allowed
    inside each  = the stream's tokens in time order (stable)

Because documents are contiguous in time, "memory e, in document order, in time order" is simply "memory e in
time order"; a running count of each memory's slots (one cumsum over a one-hot) gives every slot its buffer
row and every segment its start. No sort, no host sync, no data-dependent shapes: the buffer always has
T*k (+T) rows and S*N + 1 boundaries.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StreamPlan:
    """Where every routed slot and shared row lives in the memory-major buffer.

    src [R] long: row of the [L * S] per-(token, stream) projection table feeding each buffer row
    (token = src // S, stream = src % S; stream E is the shared memory); dest [L, k] long: buffer row of each
    routed slot; cu_seqlens [S * N + 1] int32: buffer segments, stream-major then document; R = L*k (+L).
    Shared rows occupy the last L buffer rows in token order.
    """
    src: torch.Tensor
    dest: torch.Tensor
    cu_seqlens: torch.Tensor
    num_streams: int


def build_stream_plan(topk_idx: torch.Tensor, cu_seqlens: torch.Tensor, num_memories: int,
                      shared: bool) -> StreamPlan:
    """Memory-major varlen layout of L tokens' top-k slots (and shared rows) with tensor ops only.

    topk_idx [L, k] long with distinct entries per token; cu_seqlens [N+1] (int) document boundaries of the
    L tokens (starts at 0, ends at L, empty documents allowed).
    """
    num_tokens, topk = topk_idx.shape
    device = topk_idx.device
    num_streams = num_memories + int(shared)
    doc_starts = cu_seqlens[:-1].long()  # [N]
    # prefix[e, t] = slots of memory e among tokens < t (the rank of token t's slot inside memory e); memory-
    # major so the scan runs along the contiguous dim
    onehot = torch.zeros(num_memories, num_tokens, dtype=torch.int32, device=device)
    onehot = onehot.scatter_(0, topk_idx.t(), 1)  # [E, L]
    prefix = torch.cat([onehot.new_zeros(num_memories, 1), onehot.cumsum(1, dtype=torch.int32)], 1).long()
    totals = prefix[:, -1]  # [E]
    memory_start = totals.cumsum(0) - totals  # [E]
    token = torch.arange(num_tokens, device=device)
    dest = memory_start[topk_idx] + prefix.view(-1)[topk_idx * (num_tokens + 1) + token[:, None]]  # [L, k]
    segment_starts = memory_start[:, None] + prefix[:, doc_starts]  # [E, N]

    routed_src = torch.empty(num_tokens * topk, dtype=torch.long, device=device)
    routed_src = routed_src.scatter_(0, dest.reshape(-1), (token[:, None] * num_streams + topk_idx).reshape(-1))
    src, starts = [routed_src], [segment_starts.reshape(-1)]
    if shared:
        src.append(token * num_streams + num_memories)
        starts.append(num_tokens * topk + doc_starts)
    num_rows = num_tokens * (topk + int(shared))
    starts.append(torch.full((1,), num_rows, dtype=torch.long, device=device))
    return StreamPlan(torch.cat(src), dest, torch.cat(starts).to(torch.int32), num_streams)
