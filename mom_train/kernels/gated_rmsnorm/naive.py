"""Gated RMSNorm in fp32: the definition the kernel is tested against.

    y = x * rsqrt(mean(x^2) + eps) * weight * silu(gate)    over the last dim
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def naive_gated_rmsnorm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x, gate [..., D]; weight [D] -> y [..., D] in x's dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float() * F.silu(gate.float())
    return y.to(x.dtype)
