"""Fused residual add + RMSNorm for pre-norm blocks: (y, new_residual) = (rmsnorm(residual + x) * weight,
residual + x) over the last dim, one launch per direction.

Triton is imported on first use, so this package imports without a GPU; `naive_add_rms_norm` is the
definition and `add_rms_norm_torch` the plain-torch fallback used on CPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mom_train.kernels.backend import resolve_backend
from mom_train.kernels.fused_norm.naive import naive_add_rms_norm

# widest row the Triton kernel takes (fused.MAX_D, repeated here so that choosing needs no triton import)
TRITON_MAX_D = 8192


def add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float = 1e-6,
    out_dtype: torch.dtype | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] (a branch output, e.g. bf16, or the fp32 embedding output); residual [..., D] or None
    (usually fp32); weight [D] (usually fp32).

    Returns (y, new_residual), both [..., D]:
        new_residual = residual + x, summed in fp32 and stored in residual's dtype (x's dtype when residual
        is None, where it is x cast);
        y = new_residual * rsqrt(mean(new_residual^2) + eps) * weight, in fp32, returned in out_dtype
        (None: new_residual's dtype).
    Differentiable in x, residual and weight, with gradients flowing from both outputs.
    backend: "triton" (one kernel per direction; CUDA tensors, or CPU under TRITON_INTERPRET=1, D <= 8192),
    "torch" (plain torch autograd), or "auto" (triton for CUDA tensors when triton is installed and
    D <= 8192, torch otherwise).
    """
    D = x.shape[-1]
    _check_inputs(x, residual, weight)
    residual_dtype = residual.dtype if residual is not None else x.dtype
    out_dtype = out_dtype or residual_dtype
    if _resolve_backend(backend, x) == "torch" or x.numel() == 0:
        return add_rms_norm_torch(x, residual, weight, eps, out_dtype)
    from mom_train.kernels.fused_norm.fused import add_rms_norm_triton

    res2 = residual.reshape(-1, D) if residual is not None else None
    y, new_residual = add_rms_norm_triton(x.reshape(-1, D), res2, weight, eps, out_dtype)
    return y.view(x.shape), new_residual.view(x.shape)


def add_rms_norm_torch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                       out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch (autograd) version of `add_rms_norm`: x, residual (or None) [..., D]; weight [D]."""
    residual_dtype = residual.dtype if residual is not None else x.dtype
    h = x.float() if residual is None else x.float() + residual.float()
    new_residual = h.to(residual_dtype)
    y = F.rms_norm(new_residual.float(), (x.shape[-1],), weight.float(), eps)
    return y.to(out_dtype), new_residual


def _check_inputs(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor) -> None:
    D = x.shape[-1]
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"add_rms_norm: residual has shape {tuple(residual.shape)}, expected x's {tuple(x.shape)}")
    if weight.shape != (D,):
        raise ValueError(f"add_rms_norm: weight has shape {tuple(weight.shape)}, expected [D] = [{D}]")


def _resolve_backend(backend: str, x: torch.Tensor) -> str:
    """The backend that runs this input, "triton" or "torch"; raises when "triton" cannot run it."""
    return resolve_backend("add_rms_norm", backend, x, triton_fits=x.shape[-1] <= TRITON_MAX_D)


__all__ = ["add_rms_norm", "add_rms_norm_torch", "naive_add_rms_norm"]
