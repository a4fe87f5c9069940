"""SwiGLU feed-forward block."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mom_train.config import mlp_intermediate_size  # noqa: F401 (re-exported)
from mom_train.model.linear import make_linear


class SwiGLU(nn.Module):
    """y = down(silu(gate(x)) * up(x)); x [..., hidden] -> y [..., hidden]."""

    def __init__(self, hidden_size: int, intermediate_size: int, init_std: float = 0.02, backend: str = "auto"):
        super().__init__()
        self.init_std = init_std
        # auto/triton: the fused SwiGLU kernel on CUDA (keeps only gate and up for backward); torch: plain torch
        self.backend = backend
        self.gate_proj = make_linear(hidden_size, intermediate_size, kind="column")
        self.up_proj = make_linear(hidden_size, intermediate_size, kind="column")
        self.down_proj = make_linear(intermediate_size, hidden_size, kind="row")
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for linear in (self.gate_proj, self.up_proj, self.down_proj):
            nn.init.normal_(linear.weight, 0.0, self.init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        if x.is_cuda and self.backend != "torch":
            from mom_train.kernels.swiglu import swiglu
            from mom_train.model.recompute import recompute_in_backward

            # the product (down_proj's saved input) is rebuilt from gate and up in backward, not kept
            hidden = swiglu(gate, up)
            with recompute_in_backward(hidden, lambda: swiglu(gate, up)):
                return self.down_proj(hidden)
        return self.down_proj(F.silu(gate) * up)
