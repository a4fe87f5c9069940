"""RMSNorm and the gated RMSNorm used on the outputs of linear-attention heads.

Both use torch's rms_norm (a fused kernel on GPU, fp32 accumulation inside) in the input's dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight over the last dim; x [..., dim] -> y [..., dim] in x's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


class GatedRMSNorm(nn.Module):
    """y = rmsnorm(x) * weight * silu(gate) over the last dim (per head); x, gate [..., dim].

    backend auto/triton: one fused Triton kernel per direction on CUDA inputs; torch: torch's rms_norm.
    """

    def __init__(self, dim: int, eps: float = 1e-6, backend: str = "auto"):
        super().__init__()
        self.eps = eps
        self.backend = backend
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and self.backend != "torch":
            from mom_train.kernels.gated_rmsnorm import gated_rmsnorm

            return gated_rmsnorm(x, gate.to(x.dtype), self.weight, self.eps)
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps) * F.silu(gate.to(x.dtype))
