"""Gated delta rule: S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,  o_t = scale * S_t^T q_t.

Every function here takes the same arguments:
    q, k: [B, T, H, K]; v: [B, T, H, V]; g (log decay, fp32) and beta: [B, T, H];
    scale: float (default K ** -0.5); initial_state: [N, H, K, V] fp32, N = B, or len(cu_seqlens) - 1 when
    packed (then B == 1); cu_seqlens: int32 [N+1] document offsets (empty segments allowed);
    use_qk_l2norm_in_kernel: l2-normalise q and k (eps 1e-6) inside.
and returns (o [B, T, H, V] in v's dtype, final state [N, H, K, V] fp32 or None).

The Triton kernels are imported on first call, so importing this package needs neither triton nor a GPU.
"""
from __future__ import annotations

import torch

from mom_train.kernels.backend import resolve_backend
from mom_train.kernels.gated_delta_rule.chunk_torch import chunk_gated_delta_rule_torch
from mom_train.kernels.gated_delta_rule.naive import naive_recurrent_gated_delta_rule

__all__ = [
    "chunk_gated_delta_rule",
    "chunk_gated_delta_rule_torch",
    "fused_recurrent_gated_delta_rule",
    "gated_delta_rule",
    "naive_recurrent_gated_delta_rule",
]

# inference inputs up to this many tokens go to the token-by-token kernel (decoding, short prefills)
FUSED_RECURRENT_MAX_T = 64


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
    """Chunked Triton kernel (training and prefill), differentiable in every input; shapes in the module doc."""
    from mom_train.kernels.gated_delta_rule.chunk import chunk_gated_delta_rule as kernel

    return kernel(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                  output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                  use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)


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
    """Token-by-token Triton kernel for decoding, forward only; inplace_final_state writes the final state into
    initial_state. Shapes in the module doc."""
    from mom_train.kernels.gated_delta_rule.fused_recurrent import fused_recurrent_gated_delta_rule as kernel

    return kernel(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                  output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                  use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, inplace_final_state=inplace_final_state)


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm_in_kernel: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The entry point for models: picks an implementation; shapes in the module doc.

    backend: "torch" (chunked PyTorch), "triton", or "auto" (triton for CUDA tensors when triton is installed,
    torch otherwise). With triton, inputs of at most FUSED_RECURRENT_MAX_T tokens that need no gradient run the
    fused recurrent kernel; everything else runs the chunked kernel.
    """
    backend = resolve_backend("gated_delta_rule", backend, q)
    kwargs = dict(scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                  cu_seqlens=cu_seqlens, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)
    if backend == "torch":
        return chunk_gated_delta_rule_torch(q, k, v, g, beta, **kwargs)
    inputs = (q, k, v, g, beta, initial_state)
    needs_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs)
    if not needs_grad and q.shape[1] <= FUSED_RECURRENT_MAX_T:
        return fused_recurrent_gated_delta_rule(q, k, v, g, beta, **kwargs)
    return chunk_gated_delta_rule(q, k, v, g, beta, **kwargs)
