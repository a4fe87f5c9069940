"""Short causal depthwise convolution, one segment at a time in fp32: the definition the kernel is tested against.

Per segment with inputs x_0..x_{n-1} [n, C], preceded by the W-1 inputs of `initial_state` (zeros if None):
    y_t[c] = act(sum_j weight[c, j] * x_{t-(W-1)+j}[c]),   act = silu or identity
The final state holds the last W-1 inputs of the segment (left-padded with the initial state).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def naive_short_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    activation: str | None = "silu",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x [B, T, C] (or packed [1, T, C] with cu_seqlens int32 [N+1]); weight [C, W];
    initial_state [N, C, W-1]. Returns y [B, T, C] in x's dtype and final_state [N, C, W-1] fp32 (or None)."""
    B, T, C = x.shape
    W = weight.shape[1]
    if cu_seqlens is None:
        segments = [(b, 0, T) for b in range(B)]
    else:
        bounds = cu_seqlens.tolist()
        segments = [(0, bounds[n], bounds[n + 1]) for n in range(len(bounds) - 1)]
    w = weight.float()
    outputs = [[] for _ in range(B)]
    finals = []
    for n, (row, start, end) in enumerate(segments):
        if initial_state is None:
            state = x.new_zeros(W - 1, C, dtype=torch.float32)
        else:
            state = initial_state[n].float().t()
        seq = torch.cat([state, x[row, start:end].float()], 0)  # [W-1+len, C]
        length = end - start
        out = sum(w[:, j] * seq[j:j + length] for j in range(W))  # [len, C]
        outputs[row].append(F.silu(out) if activation == "silu" else out)
        finals.append(seq[seq.shape[0] - (W - 1):].t())  # [C, W-1]
    y = torch.stack([torch.cat(o, 0) for o in outputs]).to(x.dtype)
    final_state = torch.stack(finals) if output_final_state else None
    return y, final_state
