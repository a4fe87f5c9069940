"""Chunked gated delta rule in Triton (chunk 64, WY form), forward and backward. README.md derives it.

Semantics equal naive.py: per head, S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,
o_t = scale * S_t^T q_t. No host synchronisation: packed sequences are handled with device-built index
tables and grids sized from shapes (chunk slots <= cdiv(T, 64) + N), whose unused programs exit at once.
"""
from __future__ import annotations

import torch
import triton

from mom_train.kernels.gated_delta_rule.chunk_bwd import dh_bwd, dqkw_bwd, dv_local_bwd, wy_bwd
from mom_train.kernels.gated_delta_rule.chunk_fwd import BT, chunk_tables, h_fwd, o_fwd, prepare_fwd, wu_fwd
from mom_train.kernels.gated_delta_rule.l2norm import l2norm_bwd, l2norm_fwd

# largest head dim a program holds as one state tile
MAX_HEAD_DIM = 256


def chunk_forward(q, k, v, g, beta, scale, initial_state, output_final_state, cu, num_slots, use_l2):
    """Forward launches: q, k [TT, H, K]; v [TT, H, V]; g, beta [TT, H]; cu int32 [N+1].
    Returns (o [TT, H, V], final state | None, saved) where saved holds what `chunk_backward` needs; its
    first two entries are the (normalised) q and k, which a caller may drop and rebuild."""
    coff, table = chunk_tables(cu, num_slots)
    qn, rq = l2norm_fwd(q) if use_l2 else (q, None)
    kn, rk = l2norm_fwd(k) if use_l2 else (k, None)
    gamma, Ai, w, u = prepare_fwd(kn, v, g, beta, cu, table)
    h, vnew, ht = h_fwd(kn, w, u, gamma, cu, coff, num_slots, initial_state, output_final_state)
    o = o_fwd(qn, kn, vnew, h, gamma, cu, table, scale, v.dtype)
    return o, ht, (qn, kn, v, beta, gamma, Ai, initial_state, cu, coff, table, rq, rk)


def chunk_backward(saved, scale, do, dht):
    """Gradients (dq, dk, dv, dg fp32, dbeta, dh0 | None) from `chunk_forward`'s saved tensors; dq and dk are
    with respect to the un-normalised q and k when l2norm was applied (rq, rk given)."""
    qn, kn, v, beta, gamma, Ai, initial_state, cu, coff, table, rq, rk = saved
    num_slots = table.shape[0]
    do = do.contiguous()
    w, u = wu_fwd(kn, v, beta, gamma, Ai, cu, table)
    h, vnew, _ = h_fwd(kn, w, u, gamma, cu, coff, num_slots, initial_state, False)
    dvl = dv_local_bwd(qn, kn, do, gamma, cu, table, scale)
    dh, dv2, dh0 = dh_bwd(qn, kn, w, do, dvl, gamma, cu, coff, num_slots, scale,
                          None if dht is None else dht.contiguous(), initial_state is not None)
    dq, dka, dw, dgp = dqkw_bwd(qn, kn, vnew, h, dh, do, dv2, gamma, cu, table, scale)
    dk, dv, dbeta, dg = wy_bwd(kn, v, beta, gamma, Ai, dw, dv2, dka, dgp, cu, table)
    if rq is not None:
        dq = l2norm_bwd(qn, rq, dq, normed=True)
        dk = l2norm_bwd(kn, rk, dk, normed=True)
    if dh0 is not None:
        dh0 = dh0.to(initial_state.dtype)
    return dq, dk, dv, dg, dbeta, dh0


class _ChunkGatedDeltaRuleFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, g, beta, scale, initial_state, output_final_state, cu, num_slots, use_l2):
        # q, k [TT, H, K]; v [TT, H, V]; g, beta [TT, H]; cu int32 [N+1]
        o, ht, saved = chunk_forward(q, k, v, g, beta, scale, initial_state, output_final_state, cu, num_slots,
                                     use_l2)
        ctx.save_for_backward(*saved)
        ctx.scale = scale
        ctx.dtypes = (q.dtype, k.dtype, g.dtype, beta.dtype)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        dq, dk, dv, dg, dbeta, dh0 = chunk_backward(ctx.saved_tensors, ctx.scale, do, dht)
        q_dtype, k_dtype, g_dtype, beta_dtype = ctx.dtypes
        return (dq.to(q_dtype), dk.to(k_dtype), dv, dg.to(g_dtype), dbeta.to(beta_dtype), None, dh0,
                None, None, None, None)


def _check_inputs(q, k, v, g, beta, initial_state, cu_seqlens) -> None:
    B, T, H, K = q.shape
    V = v.shape[-1]
    if k.shape != q.shape or v.shape[:3] != (B, T, H) or g.shape != (B, T, H) or beta.shape != (B, T, H):
        raise ValueError(f"expected q, k [B,T,H,K], v [B,T,H,V], g and beta [B,T,H]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}, g {tuple(g.shape)}, beta {tuple(beta.shape)}")
    if not (16 <= K <= MAX_HEAD_DIM and 16 <= V <= MAX_HEAD_DIM):
        raise ValueError(f"head dims must be in [16, {MAX_HEAD_DIM}], got K={K}, V={V}; split larger heads")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}; cast them first")
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"with cu_seqlens the batch size must be 1 (packed), got B={B}; flatten the batch")
        if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
            raise ValueError(f"cu_seqlens must be 1-D with N+1 >= 2 entries, got shape {tuple(cu_seqlens.shape)}")
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    if initial_state is not None and tuple(initial_state.shape) != (N, H, K, V):
        raise ValueError(f"initial_state must be [N, H, K, V] = {(N, H, K, V)}, got {tuple(initial_state.shape)}")


def chunk_gated_delta_rule(
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
    """Chunked gated delta rule (Triton, differentiable in every tensor input).

    q, k: [B, T, H, K]; v: [B, T, H, V]; g (log decay, fp32) and beta: [B, T, H]; K, V <= 256.
    initial_state: [N, H, K, V] with N = B, or len(cu_seqlens) - 1 when packed (then B == 1).
    cu_seqlens: int32 [N+1] sequence starts (empty segments allowed).
    Returns o: [B, T, H, V] in v's dtype and the final state [N, H, K, V] fp32 (or None).
    """
    _check_inputs(q, k, v, g, beta, initial_state, cu_seqlens)
    B, T, H, K = q.shape
    V = v.shape[-1]
    if scale is None:
        scale = K ** -0.5
    if cu_seqlens is None:
        cu = torch.arange(0, (B + 1) * T, T, device=q.device, dtype=torch.int32)
        num_slots = B * triton.cdiv(T, BT)
    else:
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
        num_slots = triton.cdiv(T, BT) + cu.shape[0] - 1
    TT = B * T
    if initial_state is not None:
        initial_state = initial_state.contiguous()
    o, ht = _ChunkGatedDeltaRuleFunction.apply(
        q.reshape(TT, H, K).contiguous(), k.reshape(TT, H, K).contiguous(), v.reshape(TT, H, V).contiguous(),
        g.reshape(TT, H).contiguous(), beta.reshape(TT, H).contiguous(), float(scale), initial_state,
        output_final_state, cu, num_slots, use_qk_l2norm_in_kernel)
    return o.view(B, T, H, V), ht
