"""MoM routing: top-k router with its load-balance loss, and the sync-free memory-major stream layout.

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
import torch.distributed as dist


@dataclass
class Routing:
    """Router decisions for L tokens over E memories, top-k.

    probs [L, E] fp32 softmax; topk_idx [L, k] long (distinct per token); topk_weight [L, k] fp32 (sum 1 per
    token, differentiable); aux_loss fp32 scalar; load [E] fp32 fraction of the L*k slots per memory.
    """
    probs: torch.Tensor
    topk_idx: torch.Tensor
    topk_weight: torch.Tensor
    aux_loss: torch.Tensor
    load: torch.Tensor


def route(logits: torch.Tensor, topk: int, group: dist.ProcessGroup | None = None) -> Routing:
    """Softmax (fp32) over logits [L, E], top-k, renormalise the k weights; plus the load-balance loss
    (over the tokens of every rank of `group`, a context-parallel group; see `load_balance_loss`)."""
    num_memories = logits.shape[-1]
    if not 1 <= topk <= num_memories:
        raise ValueError(f"route: topk={topk} must be in [1, num_memories={num_memories}]")
    probs = logits.float().softmax(-1)
    top_p, topk_idx = probs.topk(topk, dim=-1)
    topk_weight = top_p / top_p.sum(-1, keepdim=True)
    aux_loss, load = load_balance_loss(probs, topk_idx, group)
    return Routing(probs, topk_idx, topk_weight, aux_loss, load)


def load_balance_loss(probs: torch.Tensor, topk_idx: torch.Tensor,
                      group: dist.ProcessGroup | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Switch/Mixtral balance loss E * sum_e f_e * P_e and the per-memory load.

    probs [L, E] fp32; topk_idx [L, k]. f_e = fraction of tokens routed to e (sums to k over e), P_e = mean
    router probability of e; so a balanced router (f_e = k/E, P_e = 1/E) scores exactly k. Only P_e carries a
    gradient. Returns (aux_loss scalar, load [E]) where load = f_e / k is the fraction of (token, choice)
    slots routed to e (sums to 1). With no tokens both are 0.

    group: the ranks of a context-parallel group, each holding L of the sequence's tokens. f_e then counts
    every rank's tokens (one all-reduce of E counts, no gradient) and this rank returns its share of the
    loss, E * sum_e f_e * (its probability sum)_e / (all tokens): the shares add up to the loss over the
    whole sequence, with its exact gradient. load is the whole group's.
    """
    num_tokens, num_memories = probs.shape
    topk = topk_idx.shape[-1]
    counts = torch.zeros(num_memories, device=probs.device, dtype=torch.float32)
    counts = counts.scatter_add(0, topk_idx.reshape(-1), torch.ones_like(topk_idx, dtype=torch.float32).reshape(-1))
    if group is not None:
        dist.all_reduce(counts, group=group)
        num_tokens *= dist.get_world_size(group)
    denom = max(num_tokens, 1)
    tokens_frac = counts / denom  # [E], f_e
    mean_prob = probs.sum(0) / denom  # [E], P_e
    aux_loss = num_memories * (tokens_frac * mean_prob).sum()
    return aux_loss, tokens_frac / topk


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
