"""Short causal depthwise convolution (kernel W, no bias, SiLU) over packed documents, with decode state.

`short_conv` runs one Triton launch over the whole buffer (forward and backward), never reading across a
segment start; `short_conv_step` is the one-token decode update; `naive_short_conv` is the definition.
Triton is imported on first use, so this package imports without a GPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mom_train.kernels.short_conv.naive import naive_short_conv

_ACTIVATIONS = ("silu", None)


def short_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    activation: str | None = "silu",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """y[t, c] = act(sum_j weight[c, j] * x[t-(W-1)+j, c]) per segment, inputs before a segment start taken
    from initial_state (zeros if None).

    x [B, T, C], or packed [1, T, C] with cu_seqlens int32 [N+1] (empty segments allowed); weight [C, W];
    initial_state [N, C, W-1] with N = B or len(cu_seqlens) - 1. Returns y [B, T, C] in x's dtype and,
    if output_final_state, the last W-1 inputs of each segment [N, C, W-1] (left-padded with the initial
    state or zeros) in x's dtype. Differentiable in x, weight and initial_state.
    """
    B, T, C = x.shape
    if weight.dim() != 2 or weight.shape[0] != C:
        raise ValueError(f"short_conv: weight has shape {tuple(weight.shape)}, expected [C, W] with C={C}")
    W = weight.shape[1]
    if activation not in _ACTIVATIONS:
        raise ValueError(f"short_conv: activation={activation!r}; expected one of {_ACTIVATIONS}")
    if cu_seqlens is not None and B != 1:
        raise ValueError(f"short_conv: with cu_seqlens the input must be packed as [1, T, C], got B={B}")
    num_seqs = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_state is not None and tuple(initial_state.shape) != (num_seqs, C, W - 1):
        raise ValueError(f"short_conv: initial_state has shape {tuple(initial_state.shape)}, expected "
                         f"[N, C, W-1] = {(num_seqs, C, W - 1)} (one state per sequence)")
    if cu_seqlens is None and T == 1 and initial_state is not None:
        y, state = short_conv_step(x[:, 0], weight, initial_state, activation)
        return y.unsqueeze(1), state if output_final_state else None
    if cu_seqlens is None:
        # a padded batch is B segments of length T laid end to end
        cu_seqlens = torch.arange(B + 1, device=x.device, dtype=torch.int32) * T
    from mom_train.kernels.short_conv.varlen import short_conv_triton

    x2 = x.reshape(B * T, C)
    y = short_conv_triton(x2, weight, cu_seqlens, initial_state, activation)
    final_state = segment_tails(x2, initial_state, cu_seqlens, W) if output_final_state else None
    return y.view(B, T, C), final_state


def short_conv_step(x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor,
                    activation: str | None = "silu") -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step: x [B, C], weight [C, W], state [B, C, W-1] (the last W-1 inputs).
    Returns y [B, C] and the new state [B, C, W-1], both in x's dtype (like `short_conv`'s final state)."""
    window = torch.cat([state.float(), x.float().unsqueeze(-1)], -1)  # [B, C, W]
    y = (window * weight.float()).sum(-1)
    if activation == "silu":
        y = F.silu(y)
    return y.to(x.dtype), window[..., 1:].to(x.dtype)


def segment_tails(x2: torch.Tensor, state: torch.Tensor | None, cu_seqlens: torch.Tensor, W: int) -> torch.Tensor:
    """The last W-1 inputs of each segment: x2 [L, C], state [N, C, W-1] or None -> [N, C, W-1] in x2's dtype;
    positions before a segment start come from the state (zeros if None). Plain torch, differentiable."""
    L = x2.shape[0]
    starts = cu_seqlens[:-1].long()
    lengths = cu_seqlens[1:].long() - starts
    rel = lengths[:, None] - (W - 1) + torch.arange(W - 1, device=x2.device)  # [N, W-1]
    from_x = x2[(starts[:, None] + rel).clamp(0, max(L - 1, 0))]  # [N, W-1, C]
    if state is None:
        from_state = torch.zeros_like(from_x)
    else:
        rows = torch.arange(starts.shape[0], device=x2.device)[:, None]
        from_state = state.transpose(1, 2)[rows, (rel + W - 1).clamp(0, max(W - 2, 0))].to(x2.dtype)
    return torch.where((rel >= 0)[..., None], from_x, from_state).transpose(1, 2)


__all__ = ["short_conv", "short_conv_step", "naive_short_conv", "segment_tails"]
