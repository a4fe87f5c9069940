"""Fused gated RMSNorm: y = rmsnorm(x) * weight * silu(gate) over the last dim (one launch per direction).

Triton is imported on first use, so this package imports without a GPU; `naive_gated_rmsnorm` is the
definition.
"""
from __future__ import annotations

import torch

from mom_train.kernels.gated_rmsnorm.naive import naive_gated_rmsnorm


def gated_rmsnorm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x, gate [..., D] (e.g. [B, T, H, Dv]); weight [D]. Returns y [..., D] in x's dtype, computed in fp32.
    Differentiable in x, gate and weight."""
    D = x.shape[-1]
    if gate.shape != x.shape:
        raise ValueError(f"gated_rmsnorm: gate has shape {tuple(gate.shape)}, expected x's {tuple(x.shape)}")
    if weight.shape != (D,):
        raise ValueError(f"gated_rmsnorm: weight has shape {tuple(weight.shape)}, expected [D] = [{D}]")
    from mom_train.kernels.gated_rmsnorm.fused import gated_rmsnorm_triton

    y = gated_rmsnorm_triton(x.reshape(-1, D), gate.reshape(-1, D), weight, eps)
    return y.view(x.shape)


__all__ = ["gated_rmsnorm", "naive_gated_rmsnorm"]
