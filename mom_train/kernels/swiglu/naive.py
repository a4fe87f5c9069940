"""SwiGLU activation: the definition the kernel is tested against.

    y = silu(gate) * up = gate * sigmoid(gate) * up    elementwise

Inputs in float64 are computed in float64 (for reference values); everything else in fp32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def naive_swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up [..., I] -> y [..., I] in gate's dtype."""
    acc = torch.promote_types(torch.promote_types(gate.dtype, up.dtype), torch.float32)
    return (F.silu(gate.to(acc)) * up.to(acc)).to(gate.dtype)
