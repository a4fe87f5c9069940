"""Context parallelism at the op level: the gated delta rule and the short convs over a packed sequence split
contiguously over the ranks of a process group, each recurrent state carried across rank boundaries from
per-rank affine summaries (LASP-2 style, ordered composition). `mom_train.parallel.context` splits batches
and builds the `ContextParallel` object that the layers pass here.

Over one rank's rows of a segment, the delta rule S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1}
+ beta_t k_t v_t^T is affine in the state that enters: S_out = M S_in + S_0, with M [K, K] the product of
the per-token transitions and S_0 [K, V] the state reached from zero. Each rank computes (M, S_0) for the
segment it hands to the next rank, all ranks gather every rank's summary, and rank r composes ranks
0 .. r-1 in order to get the state S_in entering its first segment. The output is linear in S_in too:
o_t = o_t^0 + S_in^T (scale P_t^T q_t), so the pass from zero (which gives S_0 and o^0) and the pass from the
identity with zero values (which gives M and the readout scale P_t^T q_t) are all the kernel work: two
passes, one on the first rank and wherever a rank hands nothing on. Gradients flow back through the
composition and the gather (an all-reduce in backward), so every input's gradient equals the one-process
one.

A "chain" is one recurrent stream that may cross ranks (all heads at once): Gated DeltaNet's packed sequence
is one chain; MoM's buffer has one per memory and one for the shared memory, each its own run of segments.
Chain c enters this rank in segment first_segments[c] and leaves it from segment last_segments[c].

Documents are kept apart: a chain passes a state on only where `continues_out` says its last segment's
document goes on past this rank's rows (a zero summary otherwise), so a new document starts from zero.

The short convolution before the delta rule needs the W-1 inputs before a rank's first row (the halo):
`context_parallel_conv_states` gathers each rank's last W-1 inputs per chain and composes them the same way
(a rank with fewer rows than W-1 in a continuing chain passes part of the halo it received).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from mom_train.kernels.gated_delta_rule import gated_delta_rule
from mom_train.kernels.short_conv import segment_tails


@dataclass(frozen=True)
class ContextParallel:
    """What a model needs to run its rows of a packed sequence split over a context-parallel group.

    continues_out: this rank's last document goes on on the next rank (its states are handed on).
    single_document: the rows lie inside one document, so a state that enters them can pass through to the
    next rank (False skips computing that transition).
    """
    group: dist.ProcessGroup
    continues_out: bool
    single_document: bool = True

    def token_totals(self, counts: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, int]:
        """Per-memory routing counts [E] and the number of this rank's tokens -> their sums over the group
        (every rank holds an equal share of the sequence). One all-reduce of E numbers, no gradient."""
        dist.all_reduce(counts, group=self.group)
        return counts, num_tokens * dist.get_world_size(self.group)


def check_context_inputs(layer: str, context: ContextParallel | None, x: torch.Tensor,
                         cu_seqlens: torch.Tensor | None, cache: object | None, use_cache: bool) -> None:
    """A layer's inputs under context parallelism: packed [1, L, D] with cu_seqlens, no decoding cache."""
    if context is None:
        return
    if cu_seqlens is None or x.shape[0] != 1:
        raise ValueError(f"{layer}: context-parallel input must be packed as [1, L, D] with cu_seqlens (this "
                         f"rank's part from mom_train.parallel.context.shard_batch), got {tuple(x.shape)}")
    if cache is not None or use_cache:
        raise ValueError(f"{layer}: context parallelism splits training sequences; prefill and decode run with "
                         "the whole sequence on one rank (context=None)")


def stream_chains(cu_seqlens: torch.Tensor, num_streams: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(first_segments, last_segments) long [S] of a stream-major buffer: stream s owns segments
    s*N .. s*N + N-1 of cu_seqlens [S*N + 1]. From the shape alone (no host sync)."""
    per_stream = (cu_seqlens.shape[0] - 1) // num_streams
    first = torch.arange(num_streams, device=cu_seqlens.device) * per_stream
    return first, first + per_stream - 1


class _GatherSummaries(torch.autograd.Function):
    """[C, H, K, K+V] on every rank -> [world, C, H, K, K+V]; backward sums every rank's gradient for this
    rank's summary (an all-reduce of the full gradient, then this rank's slice: gloo has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, summary, group):
        ctx.group = group
        world = dist.get_world_size(group)
        parts = [torch.empty_like(summary) for _ in range(world)]
        dist.all_gather(parts, summary.contiguous(), group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[dist.get_rank(ctx.group)], None


def _all_gather(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[...] -> [world, ...] (not differentiable)."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.stack(parts)


def _chain_mask(continues_out: bool | torch.Tensor, num_chains: int, device: torch.device) -> torch.Tensor:
    """continues_out as bool [C] on device."""
    return torch.as_tensor(continues_out, device=device, dtype=torch.bool).expand(num_chains)


def compose_conv_prefix(tails: torch.Tensor, lengths: torch.Tensor, rank: int) -> torch.Tensor:
    """Conv state (last W-1 inputs) entering rank `rank`: for j = 0 .. rank-1, the last W-1 of (state, rank j's
    rows). tails [world, C, ch, W-1]: each rank's last W-1 inputs from a zero state; lengths long [world, C]:
    how many of them are its own rows (W-1 or more where the state must not pass through) -> [C, ch, W-1]."""
    width = tails.shape[-1]
    state = tails[0] * 0.0  # zero, but tied to the gather (see compose_prefix)
    pos = torch.arange(width, device=tails.device)
    for j in range(rank):
        rel = lengths[j][:, None] - width + pos  # [C, W-1]: position in rank j's rows, < 0 = from the state
        from_state = state.gather(-1, (rel + width).clamp(0, width - 1)[:, None, :].expand_as(state))
        state = torch.where((rel >= 0)[:, None, :], tails[j], from_state)
    return state


def context_parallel_conv_states(xs: tuple[torch.Tensor, ...], cu_seqlens: torch.Tensor,
                                 first_segments: torch.Tensor, last_segments: torch.Tensor,
                                 continues_out: bool | torch.Tensor, width: int,
                                 group: dist.ProcessGroup) -> tuple[torch.Tensor, ...]:
    """Short-conv states entering each chain's first local segment: the W-1 inputs before this rank's rows in
    that chain's document (zeros where it starts here), for several conv inputs at once (one gather for all).
    xs: this rank's conv inputs [L, ch_i] (one dtype); cu_seqlens int32 [n+1]; first/last_segments long [C];
    width W. Returns one [C, ch_i, W-1] per input in its dtype, the layout of the conv modules' initial state;
    differentiable in xs (on every rank). No host sync."""
    C = first_segments.shape[0]
    keep = _chain_mask(continues_out, C, xs[0].device)
    tails = torch.cat([segment_tails(x, None, cu_seqlens, width)[last_segments] for x in xs], 1)
    tails = tails * keep[:, None, None].to(tails.dtype)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()[last_segments]
    # the state passes through only where the chain enters and leaves in one segment and its document goes on
    passes = (first_segments == last_segments) & keep
    lengths = torch.where(passes, lengths, torch.full_like(lengths, width))
    state = compose_conv_prefix(_GatherSummaries.apply(tails, group), _all_gather(lengths, group),
                                dist.get_rank(group))
    return state.split([x.shape[1] for x in xs], 1)


def context_conv_states(inputs: tuple[torch.Tensor, ...], cu_seqlens: torch.Tensor, first_segments: torch.Tensor,
                        last_segments: torch.Tensor, context: ContextParallel,
                        width: int) -> tuple[torch.Tensor, ...]:
    """Initial states [n, ch, W-1] for short convs over inputs [1, L, ch] each (zeros except at every chain's
    first segment, which gets the halo from the earlier ranks); the layout the conv modules take."""
    halos = context_parallel_conv_states(tuple(x[0] for x in inputs), cu_seqlens, first_segments, last_segments,
                                         context.continues_out, width, context.group)
    num_segments = cu_seqlens.shape[0] - 1
    return tuple(halo.new_zeros(num_segments, *halo.shape[1:]).index_copy(0, first_segments, halo)
                 for halo in halos)


def compose_prefix(summaries: torch.Tensor, rank: int, key_dim: int) -> torch.Tensor:
    """State entering rank `rank`: S <- M_j S + S_j for j = 0 .. rank-1, from S = 0.
    summaries [world, C, H, K, K+V] (M_j = [..., :K], S_j = [..., K:]) -> [C, H, K, V]."""
    # zero, but computed from the gathered tensor: every rank's output then depends on the gather, so every
    # rank runs its backward (a collective) even where no earlier rank exists
    state = summaries[0, ..., key_dim:] * 0.0
    for j in range(rank):
        m, s = summaries[j, ..., :key_dim], summaries[j, ..., key_dim:]
        state = m @ state + s
    return state


def context_parallel_gated_delta_rule(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    cu_seqlens: torch.Tensor, first_segments: torch.Tensor, last_segments: torch.Tensor,
    continues_out: bool | torch.Tensor,
    group: dist.ProcessGroup | None, scale: float | None = None, use_qk_l2norm_in_kernel: bool = False,
    backend: str = "auto", passes_through: bool = True,
) -> torch.Tensor:
    """Gated delta rule over this rank's rows of a sequence split over `group` (see the module doc).

    q, k [1, L, H, K]; v [1, L, H, V]; g (fp32 log decay), beta [1, L, H]; cu_seqlens int32 [n+1] local
    segments; first_segments / last_segments long [C]: for each chain, the local segment it enters in and the
    one it leaves from; continues_out: whether the last segments' documents go on on the next rank (one bool,
    or bool [C] per chain). passes_through=False: no chain enters and leaves in the same segment (the rows
    hold several documents), so no transition is kept.

    Work per rank, in passes of the chunked kernel: one where the rank hands nothing on (continues_out=False,
    or the last rank) or receives nothing (the first rank); two otherwise (from zero states, which gives the
    summary's S_0 and the output before the incoming state's share, and from the identity with zero values,
    which gives the transition M and how each row reads the incoming state).
    group None (or one rank) is the single-process computation. Returns o [1, L, H, V]; differentiable in
    q, k, v, g and beta, with the gradients of the whole distributed computation.
    """
    kwargs = dict(scale=scale, cu_seqlens=cu_seqlens, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
                  backend=backend)
    world = 1 if group is None else dist.get_world_size(group)
    if world == 1:
        return gated_delta_rule(q, k, v, g, beta, **kwargs)[0]
    rank = dist.get_rank(group)
    num_segments = cu_seqlens.shape[0] - 1
    H, K, V = q.shape[2], q.shape[3], v.shape[3]
    C = first_segments.shape[0]
    if last_segments.shape != first_segments.shape:
        raise ValueError(f"first_segments {tuple(first_segments.shape)} and last_segments "
                         f"{tuple(last_segments.shape)} must both be [C], one entry per chain")
    receives = rank > 0
    if continues_out is False or rank == world - 1:
        # this rank hands nothing on (every chain's last document ends here, or it is the last rank): one pass
        # from the states that enter. A leaf that wants a gradient keeps it in the gather's backward collective
        summary = torch.zeros(C, H, K, K + V, device=q.device, dtype=torch.float32,
                              requires_grad=torch.is_grad_enabled())
        state_in = compose_prefix(_GatherSummaries.apply(summary, group), rank, K)
        h0 = torch.zeros(num_segments, H, K, V, device=q.device, dtype=torch.float32)
        h0 = h0.index_copy(0, first_segments, state_in)
        return gated_delta_rule(q, k, v, g, beta, initial_state=h0, **kwargs)[0]
    o_zero, summary, readout = handing_on_passes(q, k, v, g, beta, first_segments, last_segments, receives,
                                                 passes_through, **kwargs)
    # chains whose last document ends on this rank hand on nothing
    summary = summary * _chain_mask(continues_out, C, q.device)[:, None, None, None].float()
    state_in = compose_prefix(_GatherSummaries.apply(summary, group), rank, K)
    if not receives:
        # nothing enters the first rank, but its output must depend on the gather so that its backward (an
        # all-reduce every rank joins) runs here too
        return o_zero + (state_in.sum() * 0.0).to(o_zero.dtype)
    return (o_zero.float() + incoming_share(readout, state_in, cu_seqlens, first_segments)).to(o_zero.dtype)


def handing_on_passes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                      first_segments: torch.Tensor, last_segments: torch.Tensor, receives: bool,
                      passes_through: bool, **kwargs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The delta-rule work of a rank that hands states on (shapes as in `context_parallel_gated_delta_rule`;
    kwargs: cu_seqlens, scale, use_qk_l2norm_in_kernel, backend of `gated_delta_rule`): the pass from zero
    states, and where the rank receives states, the pass from the identity. Returns o_zero [1, L, H, V] (the
    output before the incoming states' share), the summary [C, H, K, K+V] (M, S_0) each chain hands on (M zero
    where it is not kept) and readout [1, L, H, K] (None where nothing is received)."""
    C, H, K = first_segments.shape[0], q.shape[2], q.shape[3]
    num_segments = kwargs["cu_seqlens"].shape[0] - 1
    # the rows from zero states: the output before the incoming states' share, and S_0 of every segment
    o_zero, s_all = gated_delta_rule(q, k, v, g, beta, output_final_state=True, **kwargs)
    m_last = torch.zeros(C, H, K, K, device=q.device, dtype=torch.float32)
    readout = None
    if receives:
        # the identity pushed through every chain's first segment with zero values: its outputs are
        # scale * P_t^T q_t, how row t reads the state that entered its chain (so the incoming state's share of
        # the output is one small product per chain, no rerun), and where that segment is also the last, its
        # final state is the transition M the next rank composes with (the first rank's M is never used)
        eye = torch.eye(K, device=q.device, dtype=torch.float32).expand(C, H, K, K)
        h0_eye = torch.zeros(num_segments, H, K, K, device=q.device, dtype=torch.float32)
        h0_eye = h0_eye.index_copy(0, first_segments, eye)
        readout, m_all = gated_delta_rule(q, k, torch.zeros_like(k), g, beta, initial_state=h0_eye,
                                          output_final_state=passes_through, **kwargs)
        if passes_through:
            m_last = m_all[last_segments]
    return o_zero, torch.cat([m_last, s_all[last_segments]], dim=-1), readout


def incoming_share(readout: torch.Tensor, state_in: torch.Tensor, cu_seqlens: torch.Tensor,
                   first_segments: torch.Tensor) -> torch.Tensor:
    """The output rows owe to the states entering their chains: row t of chain c's first segment reads
    state_in[c]^T readout_t. readout [1, L, H, K] (zero outside the first segments), state_in [C, H, K, V] ->
    [1, L, H, V] fp32. One masked product per chain (C is small and fixed by the shapes: no host sync)."""
    L = readout.shape[1]
    segment = torch.searchsorted(cu_seqlens[1:].long(), torch.arange(L, device=readout.device), right=True)
    share = None
    for c in range(first_segments.shape[0]):
        rows = (segment == first_segments[c]).float()[:, None, None]  # [L, 1, 1]
        part = torch.einsum("lhk,hkv->lhv", readout[0].float() * rows, state_in[c])
        share = part if share is None else share + part
    return share[None]
