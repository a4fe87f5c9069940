"""Residual add + RMSNorm: the definition the kernel is tested against.

    new_residual = (residual + x) in residual's dtype (x's dtype when residual is None), summed in fp32
    y = new_residual * rsqrt(mean(new_residual^2) + eps) * weight      over the last dim, in fp32

Inputs in float64 are computed in float64 (for reference values); everything else in fp32.
"""
from __future__ import annotations

import torch


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """fp32, or float64 when any given tensor is float64."""
    dtype = torch.float32
    for t in tensors:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def naive_add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float = 1e-6,
                       out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual [..., D] (residual may be None); weight [D].

    Returns (y [..., D] in out_dtype, default new_residual's dtype; new_residual [..., D] in residual's dtype,
    or x's when residual is None). y is computed from new_residual as stored (after its rounding).
    """
    residual_dtype = residual.dtype if residual is not None else x.dtype
    acc = compute_dtype(x, residual, weight)
    h = x.to(acc) if residual is None else x.to(acc) + residual.to(acc)
    new_residual = h.to(residual_dtype)
    hf = new_residual.to(acc)
    y = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps) * weight.to(acc)
    return y.to(out_dtype or residual_dtype), new_residual
