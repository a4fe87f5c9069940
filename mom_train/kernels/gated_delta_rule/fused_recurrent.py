"""Fused recurrent gated delta rule (Triton, forward only): the decoding kernel for T = 1 and short inputs.

One program per (sequence and head, block of V columns) walks its tokens in order with its [K, BV] slice of the
state held in fp32 registers; K is one block, so the in-kernel l2norm and k^T S see the whole key.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mom_train.kernels.gated_delta_rule.chunk_torch import check_inputs


@triton.jit
def _fused_recurrent_gdr_fwd_kernel(
    q,
    k,
    v,
    g,
    beta,
    o,
    h0,
    ht,
    cu_seqlens,
    scale,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr,
    STORE_FINAL_STATE: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    USE_QK_L2NORM: tl.constexpr,
):
    i_nh = tl.program_id(0).to(tl.int64)
    i_v = tl.program_id(1)
    i_n = i_nh // H
    i_h = i_nh % H
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    else:
        bos = i_n * T
        eos = bos + T
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_h = m_k[:, None] & m_v[None, :]
    # [BK, BV] offsets of this program's slice inside one [K, V] state
    o_h = i_nh * K * V + o_k[:, None] * V + o_v[None, :]
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_h += tl.load(h0 + o_h, mask=m_h, other=0.0).to(tl.float32)
    for t in range(bos, eos):
        # row of token t, head i_h in the [*, H] layouts
        row = t * H + i_h
        b_q = tl.load(q + row * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_k = tl.load(k + row * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_v = tl.load(v + row * V + o_v, mask=m_v, other=0.0).to(tl.float32)
        b_g = tl.load(g + row).to(tl.float32)
        b_beta = tl.load(beta + row).to(tl.float32)
        if USE_QK_L2NORM:
            b_q = b_q * tl.rsqrt(tl.sum(b_q * b_q) + 1e-6)
            b_k = b_k * tl.rsqrt(tl.sum(b_k * b_k) + 1e-6)
        b_h *= tl.exp(b_g)
        # [BV]: the prediction error for v_t, scaled by beta_t
        b_delta = (b_v - tl.sum(b_h * b_k[:, None], 0)) * b_beta
        b_h += b_k[:, None] * b_delta[None, :]
        b_o = tl.sum(b_h * b_q[:, None], 0) * scale
        tl.store(o + row * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)
    if STORE_FINAL_STATE:
        tl.store(ht + o_h, b_h.to(ht.dtype.element_ty), mask=m_h)


def fused_recurrent_gated_delta_rule(
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
    inplace_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule token by token in one Triton kernel (forward only, no autograd).

    q, k: [B, T, H, K]; v: [B, T, H, V]; g (log decay) and beta: [B, T, H];
    initial_state: [N, H, K, V] fp32 with N = B, or len(cu_seqlens) - 1 when packed (then B == 1);
    cu_seqlens: int [N+1] offsets, empty segments allowed.
    inplace_final_state: write the final state into initial_state (which is then returned as the final state),
    e.g. to advance a batched decoding cache without a copy.
    Returns o: [B, T, H, V] in v's dtype and the final state [N, H, K, V] fp32 (or None).
    """
    num_seqs = check_inputs(q, k, v, g, beta, initial_state, cu_seqlens)
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    if inplace_final_state:
        if initial_state is None or initial_state.dtype != torch.float32 or not initial_state.is_contiguous():
            raise ValueError("inplace_final_state=True writes the final state into initial_state: pass a contiguous "
                             "fp32 initial_state [N, H, K, V], or set inplace_final_state=False")
        final_state = initial_state
    elif output_final_state:
        final_state = q.new_empty(num_seqs, H, K, V, dtype=torch.float32)
    else:
        final_state = None
    q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
    if initial_state is not None:
        initial_state = initial_state.contiguous()
    o = torch.empty_like(v)
    BK = triton.next_power_of_2(K)
    BV = min(triton.next_power_of_2(V), 32 if BK <= 128 else 16)
    grid = (num_seqs * H, triton.cdiv(V, BV))
    _fused_recurrent_gdr_fwd_kernel[grid](
        q, k, v, g, beta, o, initial_state, final_state, cu_seqlens, scale, T,
        H=H, K=K, V=V, BK=BK, BV=BV,
        USE_INITIAL_STATE=initial_state is not None,
        STORE_FINAL_STATE=final_state is not None,
        IS_VARLEN=cu_seqlens is not None,
        USE_QK_L2NORM=use_qk_l2norm_in_kernel,
        num_warps=1 if BK <= 64 else 2,
    )
    return o, (final_state if output_final_state or inplace_final_state else None)
