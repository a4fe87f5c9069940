"""Triton kernel of the memory-major stream plan: one launch, one program per stream.

Program e < E scans the L tokens' top-k choices twice in blocks of BLOCK_T tokens: first it counts the slots
of memories below e (the start of memory e's block in the buffer), then it ranks memory e's slots in time
order with a block-wise cumsum carried across blocks and writes dest / src for them. The rank before every
token (prefix[t], t = 0..L) goes to a scratch row so that, after a barrier, the segment starts are one
gather per document: start(e, n) = memory_start[e] + prefix[doc_start[n]]. Program E (shared memory) writes
the last L src rows and the shared segment starts; program 0 writes the closing boundary R.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _memory_start(topk_idx, memory, L, K: tl.constexpr, KP: tl.constexpr, BLOCK_T: tl.constexpr):
    """Number of routed slots (over all L tokens) whose memory is below `memory`: int32 scalar."""
    choice = tl.arange(0, KP)
    below = tl.zeros([BLOCK_T, KP], dtype=tl.int32)
    for t0 in range(0, L, BLOCK_T):
        tokens = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
        valid = (tokens < L)[:, None] & (choice < K)[None, :]
        idx = tl.load(topk_idx + tokens[:, None] * K + choice[None, :], mask=valid, other=0)
        below += (valid & (idx < memory)).to(tl.int32)
    return tl.sum(tl.sum(below, axis=1), axis=0)


@triton.jit
def _rank_memory_slots(topk_idx, src, dest, prefix_row, memory, memory_start, L, num_streams,
                       K: tl.constexpr, KP: tl.constexpr, BLOCK_T: tl.constexpr):
    """Write dest / src of memory `memory`'s slots and its running slot count prefix_row[t], t = 0..L."""
    choice = tl.arange(0, KP)
    carry = tl.zeros([], dtype=tl.int32)
    for t0 in range(0, L, BLOCK_T):
        tokens = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
        token_ok = tokens < L
        valid = token_ok[:, None] & (choice < K)[None, :]
        slot = tokens[:, None] * K + choice[None, :]  # [BLOCK_T, KP]
        idx = tl.load(topk_idx + slot, mask=valid, other=-1)
        hit = valid & (idx == memory)
        routed = tl.sum(hit.to(tl.int32), axis=1)  # [BLOCK_T], 0 or 1 (choices are distinct)
        rank = carry + tl.cumsum(routed, axis=0) - routed  # slots of this memory before each token
        tl.store(prefix_row + tokens, rank, mask=token_ok)
        row = (memory_start + rank).to(tl.int64)  # buffer row of the token's slot
        tl.store(dest + slot, tl.broadcast_to(row[:, None], (BLOCK_T, KP)), mask=hit)
        tl.store(src + row, tokens * num_streams + memory, mask=token_ok & (routed > 0))
        carry += tl.sum(routed, axis=0)
    tl.store(prefix_row + L, carry)


@triton.jit
def _stream_plan_kernel(topk_idx, cu_in, src, dest, cu_out, prefix, L, num_docs, num_memories, num_rows,
                        K: tl.constexpr, KP: tl.constexpr, SHARED: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    stream = tl.program_id(0)
    num_streams = num_memories + SHARED
    docs = tl.arange(0, BLOCK_N)
    if stream < num_memories:
        memory_start = _memory_start(topk_idx, stream, L, K, KP, BLOCK_T)
        prefix_row = prefix + stream.to(tl.int64) * (L + 1)
        _rank_memory_slots(topk_idx, src, dest, prefix_row, stream, memory_start, L, num_streams, K, KP, BLOCK_T)
        # the prefix row was written by other threads of this program
        tl.debug_barrier()
        for n0 in range(0, num_docs, BLOCK_N):
            doc = (n0 + docs).to(tl.int64)
            doc_ok = doc < num_docs
            doc_start = tl.load(cu_in + doc, mask=doc_ok, other=0).to(tl.int64)
            before = tl.load(prefix_row + doc_start, mask=doc_ok, other=0)
            tl.store(cu_out + stream.to(tl.int64) * num_docs + doc, (memory_start + before).to(tl.int32),
                     mask=doc_ok)
    else:
        shared_start = L * K
        for t0 in range(0, L, BLOCK_T):
            tokens = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
            tl.store(src + shared_start + tokens, tokens * num_streams + num_memories, mask=tokens < L)
        for n0 in range(0, num_docs, BLOCK_N):
            doc = (n0 + docs).to(tl.int64)
            doc_ok = doc < num_docs
            doc_start = tl.load(cu_in + doc, mask=doc_ok, other=0)
            tl.store(cu_out + num_memories * num_docs + doc, (shared_start + doc_start).to(tl.int32),
                     mask=doc_ok)
    if stream == 0:
        tl.store(cu_out + num_streams * num_docs, num_rows + tl.zeros([], dtype=tl.int32))


def launch_stream_plan(topk_idx: torch.Tensor, cu_seqlens: torch.Tensor, num_memories: int, shared: bool,
                       src: torch.Tensor, dest: torch.Tensor, cu_out: torch.Tensor,
                       block_tokens: int | None = None, block_docs: int | None = None) -> None:
    """Fill src [L*k (+L)] long, dest [L, k] long and cu_out [S*N + 1] int32 from topk_idx [L, k] (contiguous,
    entries in [0, E), distinct per token) and cu_seqlens [N+1]; L >= 1. One launch of E (+1) programs.
    block_tokens / block_docs: tokens and documents per loop step (default: up to 2048 and 256)."""
    num_tokens, topk = topk_idx.shape
    num_docs = cu_seqlens.numel() - 1
    num_streams = num_memories + int(shared)
    block_tokens = block_tokens or min(2048, max(16, triton.next_power_of_2(num_tokens)))
    block_docs = block_docs or min(256, max(16, triton.next_power_of_2(max(num_docs, 1))))
    prefix = torch.empty(num_memories, num_tokens + 1, dtype=torch.int32, device=topk_idx.device)
    _stream_plan_kernel[(num_streams,)](
        topk_idx, cu_seqlens, src, dest, cu_out, prefix, num_tokens, num_docs, num_memories, src.numel(),
        K=topk, KP=triton.next_power_of_2(topk), SHARED=int(shared), BLOCK_T=block_tokens, BLOCK_N=block_docs,
        num_warps=8 if block_tokens >= 1024 else 4)
