"""Short conv (SiLU) of q, k, v followed by the chunked gated delta rule, as one autograd function that keeps
only the conv inputs for backward.

Run separately, the conv keeps its input and the delta rule keeps the conv output: two copies of q, k and v
per layer. Here the backward recomputes the conv outputs (three cheap memory-bound launches), so only the
inputs stay alive. q and k are L2-normalised per head inside the conv kernels (forward and backward), so no
separate norm pass reads them again. Training path only: no initial or final state (decoding and prefill
use the separate modules). Value heads wider than the kernel's 256 run as several heads sharing q, k, g and
beta (the state's value columns evolve independently).
"""
from __future__ import annotations

import torch
import triton

from mom_train.kernels.gated_delta_rule.chunk import MAX_HEAD_DIM, chunk_backward, chunk_forward
from mom_train.kernels.gated_delta_rule.chunk_fwd import BT
from mom_train.kernels.short_conv.varlen import segment_index, short_conv_bwd, short_conv_fwd


def _conv(x: torch.Tensor, weight: torch.Tensor, seg: torch.Tensor, pos: torch.Tensor,
          norm_dim: int | None = None) -> torch.Tensor:
    """SiLU(short conv) of x [L, C] (row stride free) -> [L, C] contiguous; each head of norm_dim channels
    L2-normalised when norm_dim is given."""
    y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    return short_conv_fwd(x, weight, None, seg, pos, "silu", y, norm_dim=norm_dim)


def _conv_qkv(q_in, k_in, v_in, w_q, w_k, w_v, seg, pos, head_k_dim):
    """Conv outputs: q and k L2-normalised per head (in the conv kernel), v as is; each [L, C]."""
    return (_conv(q_in, w_q, seg, pos, head_k_dim), _conv(k_in, w_k, seg, pos, head_k_dim),
            _conv(v_in, w_v, seg, pos))


def _heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int,
           parts: int) -> tuple[torch.Tensor, ...]:
    """Kernel layout q, k [L, H*P, K], v [L, H*P, V/P] from conv outputs [L, H*K] / [L, H*V]."""
    L = q.shape[0]
    q, k = q.view(L, num_heads, -1), k.view(L, num_heads, -1)
    if parts > 1:
        q, k = q.repeat_interleave(parts, 1), k.repeat_interleave(parts, 1)
    return q, k, v.view(L, num_heads * parts, -1)


def _repeat(x: torch.Tensor, parts: int) -> torch.Tensor:
    """Per-head [L, H] -> [L, H*P] contiguous (each head's value repeated for its P parts)."""
    return (x.repeat_interleave(parts, 1) if parts > 1 else x).contiguous()


def _fold(grad: torch.Tensor, parts: int) -> torch.Tensor:
    """Sum the gradients of the P copies of a shared per-head tensor: [L, H*P, ...] -> [L, H, ...]."""
    if parts == 1:
        return grad
    return grad.unflatten(1, (-1, parts)).sum(2)


class _ConvChunkGatedDeltaRule(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q_in, k_in, v_in, kv_in, w_q, w_k, w_v, g, beta, cu, num_heads, parts, scale):
        # k and v come as two tensors, or as column blocks of one kv_in (then backward writes one gradient)
        L = q_in.shape[0]
        if kv_in is not None:
            k_in, v_in = kv_in[:, :q_in.shape[1]], kv_in[:, q_in.shape[1]:]
        seg, pos = segment_index(cu, L)
        head_k_dim = q_in.shape[1] // num_heads
        q, k, v = _heads(*_conv_qkv(q_in, k_in, v_in, w_q, w_k, w_v, seg, pos, head_k_dim), num_heads, parts)
        num_slots = triton.cdiv(L, BT) + cu.shape[0] - 1
        o, _, saved = chunk_forward(q, k, v, _repeat(g, parts), _repeat(beta, parts), scale, None, False, cu,
                                    num_slots, False)
        # keep beta, gamma, Ai and the chunk tables; the normalised q, k and v are rebuilt from the conv inputs
        # in backward
        ctx.kv_joined = kv_in is not None
        ctx.save_for_backward(q_in, *((kv_in, kv_in) if kv_in is not None else (k_in, v_in)), w_q, w_k, w_v,
                              seg, pos, *saved[3:-2])
        ctx.shape = (num_heads, parts, scale, cu.shape[0] - 1)
        ctx.dtypes = (g.dtype, beta.dtype)
        return o.view(L, num_heads, -1)

    @staticmethod
    def backward(ctx, do):
        q_in, k_in, v_in, w_q, w_k, w_v, seg, pos, *rest = ctx.saved_tensors
        num_heads, parts, scale, num_seqs = ctx.shape
        L, key_dim = q_in.shape
        d_kv = None
        if ctx.kv_joined:
            kv_in = k_in
            k_in, v_in = kv_in[:, :key_dim], kv_in[:, key_dim:]
            d_kv = torch.empty(kv_in.shape, device=kv_in.device, dtype=kv_in.dtype)
        head_k_dim = key_dim // num_heads
        qn, kn, v = _heads(*_conv_qkv(q_in, k_in, v_in, w_q, w_k, w_v, seg, pos, head_k_dim), num_heads, parts)
        do = do.reshape(L, num_heads * parts, -1)
        # dq, dk: gradients of the normalised q, k (the conv backward goes through the norm)
        dq, dk, dv, dg, dbeta, _ = chunk_backward((qn, kn, v, *rest, None, None), scale, do, None)
        del qn, kn
        grads = []
        for i, (x, weight, dy) in enumerate(((q_in, w_q, _fold(dq, parts)), (k_in, w_k, _fold(dk, parts)),
                                             (v_in, w_v, dv))):
            dy = dy.reshape(L, -1).to(x.dtype)
            if d_kv is not None and i > 0:
                dx = d_kv[:, :key_dim] if i == 1 else d_kv[:, key_dim:]
            else:
                dx = torch.empty_like(dy)
            dx, dweight, _ = short_conv_bwd(x, weight, None, seg, pos, "silu", dy, dx, num_seqs, need_dstate=False,
                                            norm_dim=head_k_dim if i < 2 else None)
            grads.append((dx, dweight.to(weight.dtype)))
        g_dtype, beta_dtype = ctx.dtypes
        (dq_in, dw_q), (dk_in, dw_k), (dv_in, dw_v) = grads
        if d_kv is not None:
            dk_in = dv_in = None
        return (dq_in, dk_in, dv_in, d_kv, dw_q, dw_k, dw_v, _fold(dg, parts).to(g_dtype),
                _fold(dbeta, parts).to(beta_dtype), None, None, None, None)


def conv_chunk_gated_delta_rule(
    q_in: torch.Tensor, k_in: torch.Tensor | None, v_in: torch.Tensor | None,
    conv_weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    g: torch.Tensor, beta: torch.Tensor, cu_seqlens: torch.Tensor, head_k_dim: int,
    scale: float | None = None, max_head_v_dim: int = MAX_HEAD_DIM, kv_in: torch.Tensor | None = None,
) -> torch.Tensor:
    """o [L, H, V] = gated delta rule (q, k L2-normalised) over q = SiLU(conv(q_in)), k, v likewise.

    q_in, k_in [L, H*K], v_in [L, H*V]: packed rows, unit channel stride (row stride free, e.g. column
    slices of one projection buffer); conv_weights: [C, W] each for q, k, v; g (log decay, fp32) and beta
    [L, H]; cu_seqlens int32 [N+1] (empty segments allowed). Value heads wider than max_head_v_dim run as
    equal parts of at most that width. Differentiable in every tensor input.
    kv_in [L, H*K + H*V]: k and v as the column blocks of one tensor instead (pass k_in = v_in = None); its
    gradient is then one tensor too, so no concatenation of the two gradients follows in autograd.
    """
    if kv_in is not None:
        if k_in is not None or v_in is not None:
            raise ValueError("conv_chunk_gated_delta_rule: pass k_in and v_in, or kv_in, not both")
        k_in, v_in = kv_in[:, :q_in.shape[1]], kv_in[:, q_in.shape[1]:]
    L, key_dim = q_in.shape
    num_heads = g.shape[1]
    V = v_in.shape[1] // num_heads
    parts = -(-V // max_head_v_dim)
    if V % parts or key_dim != num_heads * head_k_dim or k_in.shape != q_in.shape:
        raise ValueError(f"conv_chunk_gated_delta_rule: q_in {tuple(q_in.shape)}, k_in {tuple(k_in.shape)}, "
                         f"v_in {tuple(v_in.shape)} do not split into {num_heads} heads of K={head_k_dim} and a "
                         f"value width that divides into parts of at most {MAX_HEAD_DIM}")
    if scale is None:
        scale = head_k_dim ** -0.5
    cu = cu_seqlens.to(device=q_in.device, dtype=torch.int32).contiguous()
    if kv_in is not None:
        k_in = v_in = None
    return _ConvChunkGatedDeltaRule.apply(q_in, k_in, v_in, kv_in, *(w.contiguous() for w in conv_weights), g,
                                          beta, cu, num_heads, parts, float(scale))
