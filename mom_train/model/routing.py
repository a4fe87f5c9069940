"""MoM routing: the top-k router with its load-balance loss (`route`, `TopKRouting`). The memory-major stream
layout it feeds lives with the routing kernels (`mom_train.kernels.routing`: `StreamPlan`,
`build_stream_plan`, re-exported here)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from mom_train.kernels.routing.stream_plan import StreamPlan, build_stream_plan  # noqa: F401 (re-exported)

# (per-memory counts [E], number of this rank's tokens) -> their totals over every rank holding a share of the
# same sequence (context or sequence parallelism); None when this rank holds all of it
TokenTotals = Callable[[torch.Tensor, int], tuple[torch.Tensor, int]]


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


def route(logits: torch.Tensor, topk: int, token_totals: TokenTotals | None = None) -> Routing:
    """Softmax (fp32) over logits [L, E], top-k, renormalise the k weights; plus the load-balance loss
    (over the tokens of every rank that holds a share of the sequence; see `load_balance_loss`)."""
    num_memories = logits.shape[-1]
    if not 1 <= topk <= num_memories:
        raise ValueError(f"route: topk={topk} must be in [1, num_memories={num_memories}]")
    probs = logits.float().softmax(-1)
    top_p, topk_idx = probs.topk(topk, dim=-1)
    topk_weight = top_p / top_p.sum(-1, keepdim=True)
    aux_loss, load = load_balance_loss(probs, topk_idx, token_totals)
    return Routing(probs, topk_idx, topk_weight, aux_loss, load)


class TopKRouting(nn.Module):
    """Router logits [L, E] -> Routing (no parameters: the router's linear map lives beside it).

    context: an object with `token_totals` (a context-parallel group's, `mom_train.kernels.cp`) when L is this
    rank's share of a sequence split over ranks. A parallelizing wrapper may replace this module (e.g. to route
    each rank's token shard under tensor parallelism); the model itself holds no process group."""

    def __init__(self, topk: int):
        super().__init__()
        self.topk = topk

    def forward(self, logits: torch.Tensor, context: object | None = None) -> Routing:
        return route(logits, self.topk, context.token_totals if context is not None else None)


def load_balance_loss(probs: torch.Tensor, topk_idx: torch.Tensor,
                      token_totals: TokenTotals | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Switch/Mixtral balance loss E * sum_e f_e * P_e and the per-memory load.

    probs [L, E] fp32; topk_idx [L, k]. f_e = fraction of tokens routed to e (sums to k over e), P_e = mean
    router probability of e; so a balanced router (f_e = k/E, P_e = 1/E) scores exactly k. Only P_e carries a
    gradient. Returns (aux_loss scalar, load [E]) where load = f_e / k is the fraction of (token, choice)
    slots routed to e (sums to 1). With no tokens both are 0.

    token_totals: given when L is this rank's share of a sequence split over ranks (context or sequence
    parallelism). f_e then counts every rank's tokens (the totals: one all-reduce of E counts, no gradient)
    and this rank returns its share of the loss, E * sum_e f_e * (its probability sum)_e / (all tokens): the
    shares add up to the loss over the whole sequence, with its exact gradient. load is the whole sequence's.
    """
    num_tokens, num_memories = probs.shape
    topk = topk_idx.shape[-1]
    counts = torch.zeros(num_memories, device=probs.device, dtype=torch.float32)
    counts = counts.scatter_add(0, topk_idx.reshape(-1), torch.ones_like(topk_idx, dtype=torch.float32).reshape(-1))
    if token_totals is not None:
        counts, num_tokens = token_totals(counts, num_tokens)
    denom = max(num_tokens, 1)
    tokens_frac = counts / denom  # [E], f_e
    mean_prob = probs.sum(0) / denom  # [E], P_e
    aux_loss = num_memories * (tokens_frac * mean_prob).sum()
    return aux_loss, tokens_frac / topk
