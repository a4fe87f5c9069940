"""RMSNorm and the gated RMSNorm used on the outputs of linear-attention heads.

RMSNorm.forward and the torch path of GatedRMSNorm use torch's rms_norm (fp32 accumulation inside) in the
input's dtype; the block-level residual add + norm and the gated norm have fused Triton kernels on CUDA.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight over the last dim; x [..., dim] -> y [..., dim] in x's dtype.

    `add_and_norm` is the pre-norm block form: it adds a branch output to the residual stream and normalises
    the sum in one fused kernel (backend auto/triton on CUDA; torch otherwise).
    """

    def __init__(self, dim: int, eps: float = 1e-6, backend: str = "auto"):
        super().__init__()
        self.eps = eps
        self.backend = backend
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [..., dim] branch output, residual [..., dim] or None (first block: x starts the stream) ->
        (normalised sum in the autocast dtype when autocast is on, else the residual's; new residual = residual
        + x in the residual's dtype, fp32 for an fp32 stream)."""
        from mom_train.kernels.fused_norm import add_rms_norm

        out_dtype = None
        if torch.is_autocast_enabled(x.device.type):
            out_dtype = torch.get_autocast_dtype(x.device.type)
        return add_rms_norm(x, residual, self.weight, self.eps, out_dtype=out_dtype,
                            backend="torch" if self.backend == "torch" else "auto")


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


def gated_norm_linear(norm: GatedRMSNorm, linear: nn.Module, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """linear(norm(x, gate) with the head dims flattened): x, gate [..., H, dv] -> [..., out_features].

    On the fused CUDA path the norm output (the linear's saved input) is rebuilt from x and gate in backward
    instead of kept; x and gate are kept by the norm anyway.
    """
    flat = norm(x, gate).flatten(-2)
    if not (x.is_cuda and norm.backend != "torch"):
        return linear(flat)
    from mom_train.model.recompute import recompute_in_backward

    with recompute_in_backward(flat, lambda: norm(x, gate).flatten(-2)):
        return linear(flat)

