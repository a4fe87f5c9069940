"""The gated delta rule, step by step in fp32: the definition every faster implementation is tested against.

Per head, with state S in R^{K x V}:
    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    o_t = scale * S_t^T q_t
"""
from __future__ import annotations

import torch


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim (the in-kernel q/k normalisation)."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def naive_recurrent_gated_delta_rule(
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
    """Reference recurrence (slow, differentiable, fp32 inside).

    q, k: [B, T, H, K]; v: [B, T, H, V]; g (log decay) and beta: [B, T, H];
    initial_state: [N, H, K, V] with N = B, or len(cu_seqlens) - 1 when packed (then B == 1).
    Returns o: [B, T, H, V] in v's dtype and the final state [N, H, K, V] fp32 (or None).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    if scale is None:
        scale = K ** -0.5
    dtype = v.dtype
    q, k, v, g, beta = (x.float() for x in (q, k, v, g, beta))
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q), l2norm(k)
    if cu_seqlens is None:
        spans = [(b, 0, T) for b in range(B)]
    else:
        if B != 1:
            raise ValueError(f"with cu_seqlens the batch size must be 1 (packed), got B={B}")
        bounds = cu_seqlens.tolist()
        spans = [(0, bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]
    outputs = torch.zeros(B, T, H, V, dtype=torch.float32, device=q.device)
    finals = []
    for n, (b, start, end) in enumerate(spans):
        if initial_state is not None:
            state = initial_state[n].float()
        else:
            state = q.new_zeros(H, K, V)
        rows = []
        for t in range(start, end):
            state = state * g[b, t].exp()[:, None, None]
            # [H, V]: what the state predicts for k_t, corrected towards v_t
            delta = (v[b, t] - torch.einsum("hkv,hk->hv", state, k[b, t])) * beta[b, t][:, None]
            state = state + k[b, t][:, :, None] * delta[:, None, :]
            rows.append(torch.einsum("hkv,hk->hv", state, q[b, t]) * scale)
        if rows:
            outputs = outputs.index_put((torch.tensor([b]), torch.arange(start, end)),
                                        torch.stack(rows, 0))
        finals.append(state)
    final_state = torch.stack(finals, 0) if output_final_state else None
    return outputs.to(dtype), final_state
