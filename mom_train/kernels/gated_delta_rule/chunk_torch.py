"""Chunked gated delta rule in plain PyTorch (WY form): the CPU path, differentiable by autograd.

Per chunk of C tokens with gamma = within-chunk cumsum of g:
    A_ij = beta_i (k_i . k_j) exp(gamma_i - gamma_j) for i > j;  (I + A) [W | U] = [beta exp(gamma) K | beta V]
so the chunk is an affine map of its incoming state, S_out = M S_in + L, with
    M = exp(gamma_C) I - Kd^T W,  L = Kd^T U,  Kd = exp(gamma_C - gamma) K.
All chunk-local work runs batched over chunks, sequences and heads; only the product of the maps over chunks
is a Python loop. Packed documents are laid out with every segment padded to whole chunks (pad rows have
k = v = g = beta = 0, so they change nothing), computed with index arithmetic on the device. On a GPU the
loop runs over all chunks in order, its length from shapes (no host sync); on the CPU, where reading a
value costs nothing, it runs over the chunk positions inside a segment, all segments at once, so many short
documents (the MoM memory streams) take one or two steps.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mom_train.kernels.gated_delta_rule.naive import l2norm

CHUNK_SIZE = 64


def check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
) -> int:
    """Validate shapes (no host syncs) and return N, the number of sequences."""
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be [B, T, H, K], got q {tuple(q.shape)} and k {tuple(k.shape)}")
    B, T, H, _ = q.shape
    if v.dim() != 4 or v.shape[:3] != (B, T, H):
        raise ValueError(f"v must be [B, T, H, V] = [{B}, {T}, {H}, V] like q, got {tuple(v.shape)}")
    for name, x in (("g", g), ("beta", beta)):
        if x.shape != (B, T, H):
            raise ValueError(f"{name} must be [B, T, H] = [{B}, {T}, {H}] (one value per token and head), "
                             f"got {tuple(x.shape)}")
    if cu_seqlens is None:
        num_seqs = B
    else:
        if B != 1:
            raise ValueError(f"with cu_seqlens the input must be packed into batch size 1, got B={B}; "
                             f"reshape to [1, B*T, ...] and pass the document offsets")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 or cu_seqlens.dtype.is_floating_point:
            raise ValueError(f"cu_seqlens must be an integer tensor [N+1] of offsets starting at 0 and ending at "
                             f"T, got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
        num_seqs = cu_seqlens.numel() - 1
    if initial_state is not None:
        expected = (num_seqs, H, q.shape[-1], v.shape[-1])
        if tuple(initial_state.shape) != expected:
            raise ValueError(f"initial_state must be [N, H, K, V] = {list(expected)} (N = number of sequences), "
                             f"got {tuple(initial_state.shape)}")
    return num_seqs


def chunk_gated_delta_rule_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm_in_kernel: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule, chunked (same semantics as naive_recurrent_gated_delta_rule), computed in fp32.

    q, k: [B, T, H, K]; v: [B, T, H, V]; g (log decay) and beta: [B, T, H];
    initial_state: [N, H, K, V] with N = B, or len(cu_seqlens) - 1 when packed (then B == 1);
    cu_seqlens: int [N+1] offsets, empty segments allowed.
    Returns o: [B, T, H, V] in v's dtype and the final state [N, H, K, V] fp32 (or None).
    """
    num_seqs = check_inputs(q, k, v, g, beta, initial_state, cu_seqlens)
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    # chunks shorter than 64 for short inputs (decoding) give the same result with less padding
    chunk_size = CHUNK_SIZE if T >= CHUNK_SIZE else max(1, 1 << (T - 1).bit_length())
    if cu_seqlens is not None and q.device.type == "cpu" and T > 0:
        chunk_size = _cpu_chunk_size(cu_seqlens, K + V)
    dtype = v.dtype
    q, k, v, g, beta = (x.float() for x in (q, k, v, g, beta))
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q), l2norm(k)
    q = q * scale
    if initial_state is not None:
        initial_state = initial_state.float()
    if cu_seqlens is None:
        o, final_state = _fixed_length(q, k, v, g, beta, initial_state, chunk_size)
    else:
        o, final_state = _varlen(q, k, v, g, beta, initial_state, cu_seqlens, num_seqs, chunk_size)
    return o.to(dtype), (final_state if output_final_state else None)


def _cpu_chunk_size(cu_seqlens: torch.Tensor, width: int) -> int:
    """Chunk size with the least padded work for these segments (CPU only: it reads the lengths).

    Every segment is padded to whole chunks and each padded row costs ~(C + width) flops per channel, so many
    short segments (MoM memory streams) are cheaper in small chunks; the result is the same for any size.
    """
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()

    def cost(c: int) -> int:
        return int(((lengths + c - 1) // c).clamp_min(1).sum()) * c * (c + width)

    return min((16, 32, CHUNK_SIZE), key=cost)


def _fixed_length(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """B sequences of T tokens: chunk each sequence in place; returns o [B, T, H, V], final [B, H, K, V]."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    num_chunks = -(-T // chunk_size)
    pad = num_chunks * chunk_size - T

    def to_chunks(x: torch.Tensor) -> torch.Tensor:
        # [B, T, H, *] -> [NC, B, H, C, *]
        x = F.pad(x, (0, 0) * (x.dim() - 3) + (0, 0, 0, pad))
        x = x.view(B, num_chunks, chunk_size, H, *x.shape[3:])
        return x.permute(1, 0, 3, 2, *range(4, x.dim()))

    state0 = q.new_zeros(B * H, K, V) if initial_state is None else initial_state.reshape(B * H, K, V)
    o, states_out = _chunked(*(to_chunks(x) for x in (q, k, v, g, beta)), state0)
    # [NC, B, H, C, V] -> [B, T, H, V]
    o = o.permute(1, 0, 3, 2, 4).reshape(B, num_chunks * chunk_size, H, V)[:, :T].contiguous()
    final_state = states_out[-1] if num_chunks > 0 else state0
    return o, final_state.view(B, H, K, V)


def _varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor,
    num_seqs: int,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed documents: pad every segment to whole chunks (at least one, so empty segments keep their state)."""
    _, T, H, K = q.shape
    V = v.shape[-1]
    device = q.device
    # at most ceil(len / C) + 1 chunks per segment in total: the buffer size comes from shapes only
    num_chunks = -(-T // chunk_size) + num_seqs
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    seg_chunks = ((cu[1:] - cu[:-1] + chunk_size - 1) // chunk_size).clamp_min(1)  # [N]
    first_chunk = seg_chunks.cumsum(0) - seg_chunks  # [N]
    tokens = torch.arange(T, device=device)
    token_seg = torch.searchsorted(cu[1:], tokens, right=True).clamp_max(max(num_seqs - 1, 0))  # [T]
    rows = first_chunk[token_seg] * chunk_size + tokens - cu[token_seg]  # [T]

    def to_chunks(x: torch.Tensor) -> torch.Tensor:
        # [1, T, H, *] -> [NC, 1, H, C, *], pad rows zero
        buf = x.new_zeros(num_chunks * chunk_size, *x.shape[2:]).index_copy(0, rows, x[0])
        buf = buf.view(num_chunks, 1, chunk_size, H, *x.shape[3:])
        return buf.permute(0, 1, 3, 2, *range(4, buf.dim()))

    chunk_ids = torch.arange(num_chunks, device=device)
    starts = torch.zeros(num_chunks, dtype=torch.bool, device=device).index_fill(0, first_chunk, True)
    restarts = None
    if initial_state is not None:
        chunk_seg = torch.searchsorted(first_chunk, chunk_ids, right=True) - 1  # [NC]
        restarts = initial_state.index_select(0, chunk_seg)  # [NC, H, K, V]
    state0 = q.new_zeros(H, K, V)
    segments = None
    if q.device.type == "cpu":
        init = initial_state if initial_state is not None else q.new_zeros(num_seqs, H, K, V)
        segments = (first_chunk, seg_chunks, init)
    o, states_out = _chunked(*(to_chunks(x) for x in (q, k, v, g, beta)), state0, starts, restarts, segments)
    # [NC, 1, H, C, V] -> padded rows [NC * C, H, V] -> packed [1, T, H, V]
    o = o.squeeze(1).transpose(1, 2).reshape(num_chunks * chunk_size, H, V).index_select(0, rows)
    final_state = states_out.index_select(0, first_chunk + seg_chunks - 1).view(num_seqs, H, K, V)
    return o.unsqueeze(0), final_state


def _chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state0: torch.Tensor,
    starts: torch.Tensor | None = None,
    restarts: torch.Tensor | None = None,
    segments: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked recurrence over [NC, Bc, H, C, *] inputs (q already scaled).

    state0: [Bc*H, K, V], the state entering chunk 0. starts: [NC] bool, chunks whose incoming state is reset to
    restarts [NC, H, K, V] (zeros when None; Bc == 1 then). segments (CPU, Bc == 1): (first chunk [N], chunks
    [N], initial state [N, H, K, V]) of each segment, to scan all segments at once. Returns o
    [NC, Bc, H, C, V] and the state after each chunk [NC, Bc*H, K, V].
    """
    num_chunks, Bc, H, C, K = q.shape
    V = v.shape[-1]
    gamma = g.cumsum(-1)  # [NC, Bc, H, C]
    diff = gamma[..., :, None] - gamma[..., None, :]  # [NC, Bc, H, C, C]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    strict = causal.tril(-1)
    # masked before exp: the upper triangle of diff can be large and positive
    decay = diff.masked_fill(~causal, float("-inf")).exp()
    a = (beta[..., None] * (k @ k.transpose(-1, -2)) * decay).masked_fill(~strict, 0.0)
    rhs = torch.cat([(beta * gamma.exp())[..., None] * k, beta[..., None] * v], -1)
    w, u = torch.linalg.solve_triangular(a, rhs, upper=False, unitriangular=True).split([K, V], -1)
    gamma_last = gamma[..., -1:]  # [NC, Bc, H, 1]
    k_decayed = k * (gamma_last - gamma).exp()[..., None]
    eye = torch.eye(K, device=q.device)
    m = gamma_last.exp()[..., None] * eye - k_decayed.transpose(-1, -2) @ w  # [NC, Bc, H, K, K]
    m_local = k_decayed.transpose(-1, -2) @ u  # [NC, Bc, H, K, V]
    m = m.reshape(num_chunks, Bc * H, K, K)
    m_local = m_local.reshape(num_chunks, Bc * H, K, V)
    if segments is not None:
        states_in, states_out = _segment_scan(m, m_local, *segments)
        v_new = u - w @ states_in.unsqueeze(1)  # [NC, 1, H, C, V]
        o = (q * gamma.exp()[..., None]) @ states_in.unsqueeze(1) + ((q @ k.transpose(-1, -2)) * decay) @ v_new
        return o, states_out
    if starts is not None:
        # fold the resets into the maps: a starting chunk ignores the carried state
        keep = (~starts).view(num_chunks, 1, 1, 1)
        if restarts is not None:
            m_local = m_local + (m @ restarts) * (~keep)
        m = m * keep
    states = []
    state = state0
    # unbind, not m[c]: indexing inside the loop makes backward zero-fill a full [NC, ...] gradient per chunk
    for m_local_c, m_c in zip(m_local.unbind(0), m.unbind(0)):
        state = torch.baddbmm(m_local_c, m_c, state)
        states.append(state)
    states_out = torch.stack(states) if states else state0.new_zeros(0, Bc * H, K, V)
    states_in = torch.cat([state0[None], states_out[:-1]])  # [NC, Bc*H, K, V]
    if starts is not None:
        states_in = states_in * keep if restarts is None else torch.where(keep, states_in, restarts)
    states_in = states_in.view(num_chunks, Bc, H, K, V)
    v_new = u - w @ states_in  # [NC, Bc, H, C, V]
    o = (q * gamma.exp()[..., None]) @ states_in + ((q @ k.transpose(-1, -2)) * decay) @ v_new
    return o, states_out


def _segment_scan(
    m: torch.Tensor,
    m_local: torch.Tensor,
    first_chunk: torch.Tensor,
    seg_chunks: torch.Tensor,
    init: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply each segment's chunk maps in order, all segments at once (reads the longest segment on the host).

    m [NC, H, K, K], m_local [NC, H, K, V]: chunk c maps S to m[c] S + m_local[c]; first_chunk, seg_chunks [N];
    init [N, H, K, V]. Returns the state entering and leaving every chunk, each [NC, H, K, V] (chunks past the
    last segment, pure padding, get zeros).
    """
    num_chunks = m.shape[0]
    state = init
    outs, rows = [], []
    for j in range(int(seg_chunks.max()) if seg_chunks.numel() else 0):
        live = seg_chunks > j  # [N]
        idx = (first_chunk + j).clamp_max(num_chunks - 1)
        state = torch.where(live[:, None, None, None], m[idx] @ state + m_local[idx], state)
        outs.append(state)
        # a finished segment writes to the spare row num_chunks, dropped below
        rows.append(torch.where(live, first_chunk + j, num_chunks))
    states_out = m_local.new_zeros(num_chunks + 1, *m_local.shape[1:])
    if outs:
        states_out = states_out.index_copy(0, torch.cat(rows), torch.cat(outs))
    states_out = states_out[:num_chunks]
    is_first = torch.zeros(num_chunks, dtype=torch.bool, device=m.device).index_fill(0, first_chunk, True)
    chunk_seg = (torch.searchsorted(first_chunk, torch.arange(num_chunks, device=m.device), right=True) - 1)
    states_in = torch.cat([states_out[:1] * 0, states_out[:-1]])
    states_in = torch.where(is_first[:, None, None, None], init.index_select(0, chunk_seg.clamp_min(0)), states_in)
    return states_in, states_out
