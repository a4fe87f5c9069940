"""SwiGLU activation y = silu(gate) * up that keeps only gate and up for backward (silu(gate) and the
product are recomputed), one Triton launch per direction on CUDA.

Triton is imported on first use, so this package imports without a GPU; `naive_swiglu` is the definition.
"""
from __future__ import annotations

import torch

from mom_train.kernels.backend import resolve_backend
from mom_train.kernels.swiglu.naive import naive_swiglu



def swiglu(gate: torch.Tensor, up: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """gate, up [..., I] of one dtype (e.g. the two column halves of a [..., 2I] projection output; any strides,
    the Triton path copies only inputs whose last stride is not 1). Returns y = silu(gate) * up [..., I] in
    that dtype, computed in fp32. Differentiable in gate and up; saves only gate and up for backward.

    backend: "triton" (CUDA tensors, or CPU under TRITON_INTERPRET=1), "torch" (the same autograd Function
    with plain torch math), or "auto" (triton for CUDA tensors when triton is installed, torch otherwise).
    """
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: up has shape {tuple(up.shape)}, expected gate's {tuple(gate.shape)}")
    if gate.dtype != up.dtype:
        raise ValueError(f"swiglu: gate is {gate.dtype} but up is {up.dtype}; pass one dtype")
    if _resolve_backend(backend, gate) == "torch" or gate.numel() == 0:
        return _SwiGLUFunction.apply(gate, up, False)
    I = gate.shape[-1]
    y = _SwiGLUFunction.apply(_rows(gate, I), _rows(up, I), True)
    return y.view(gate.shape)


# the torch forward is the definition itself (fp32 math, output in gate's dtype)
swiglu_fwd_torch = naive_swiglu


def swiglu_bwd_torch(gate: torch.Tensor, up: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gate, up, dy [..., I] -> (dgate, dup) [..., I] in gate's and up's dtypes, fp32 math."""
    acc = torch.promote_types(gate.dtype, torch.float32)
    g, u, d = gate.to(acc), up.to(acc), dy.to(acc)
    sig = torch.sigmoid(g)
    dgate = d * u * sig * (1 + g * (1 - sig))
    dup = d * (g * sig)
    return dgate.to(gate.dtype), dup.to(up.dtype)


class _SwiGLUFunction(torch.autograd.Function):
    """y = silu(gate) * up; saves gate and up only. use_triton: Triton launchers on [N, I] inputs (unit column
    stride), else torch math on inputs of any shape."""

    @staticmethod
    def forward(ctx, gate, up, use_triton):
        ctx.save_for_backward(gate, up)
        ctx.use_triton = use_triton
        if not use_triton:
            return swiglu_fwd_torch(gate, up)
        from mom_train.kernels.swiglu.fused import swiglu_fwd

        return swiglu_fwd(gate, up, torch.empty(gate.shape, device=gate.device, dtype=gate.dtype))

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        if not ctx.use_triton:
            dgate, dup = swiglu_bwd_torch(gate, up, dy)
            return dgate, dup, None
        from mom_train.kernels.swiglu.fused import swiglu_bwd

        if dy.stride(-1) != 1:
            dy = dy.contiguous()
        dgate = torch.empty(gate.shape, device=gate.device, dtype=gate.dtype)
        dup = torch.empty(up.shape, device=up.device, dtype=up.dtype)
        dgate, dup = swiglu_bwd(gate, up, dy, dgate, dup)
        return dgate, dup, None


def _rows(t: torch.Tensor, I: int) -> torch.Tensor:
    """t [..., I] as [N, I] with unit column stride (a view when the layout allows)."""
    t = t.reshape(-1, I)
    return t if t.stride(-1) == 1 else t.contiguous()


def _resolve_backend(backend: str, t: torch.Tensor) -> str:
    """The backend that runs this input, "triton" or "torch"; raises when "triton" cannot run it."""
    return resolve_backend("swiglu", backend, t)


__all__ = ["swiglu", "swiglu_bwd_torch", "swiglu_fwd_torch", "naive_swiglu"]
