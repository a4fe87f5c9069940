"""Short causal depthwise convolution over packed documents (varlen), with decode state.

Packed input is one row [1, T, C] holding N segments (cu_seqlens int32 [N+1]); a padded batch [B, T, C]
is the special case of B segments of length T. The convolution never reads across a segment start: the
W-1 inputs before a segment's first token come from `initial_state` (zeros when None). One depthwise conv1d
runs over the whole packed row; only the first W-1 outputs of each segment (the ones whose window crosses
the start) are recomputed from a small gathered window and written over it with `index_put`, so the extra
work and its backward scale with the number of segments, not tokens. No host syncs.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_ACTIVATIONS = ("silu", None)


def segment_positions(cu_seqlens: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Segment index [T] and position inside the segment [T] of every packed token (long)."""
    t = torch.arange(num_tokens, device=cu_seqlens.device)
    seg = torch.searchsorted(cu_seqlens[1:].long(), t, right=True)
    # a malformed cu_seqlens (last entry < T) would give seg == N; clamp so indexing stays in range
    seg = seg.clamp(max=cu_seqlens.numel() - 2)
    return seg, t - cu_seqlens.long()[seg]


class ShortConvolution(nn.Module):
    """y[t, c] = act(sum_j weight[c, j] * x[t - (W-1) + j, c] + bias[c]), per segment; weight [C, W]."""

    def __init__(self, channels: int, kernel_size: int, bias: bool = False, activation: str | None = "silu",
                 backend: str = "auto"):
        super().__init__()
        # auto/triton: the Triton varlen kernel on CUDA inputs; torch: always the conv1d path below
        self.backend = backend
        if activation not in _ACTIVATIONS:
            raise ValueError(f"ShortConvolution: activation={activation!r}; expected one of {_ACTIVATIONS}")
        self.kernel_size = kernel_size
        self.activation = activation
        self.weight = nn.Parameter(torch.empty(channels, kernel_size))
        self.bias = nn.Parameter(torch.empty(channels)) if bias else None
        self.reset_parameters()

    @property
    def channels(self) -> int:
        """Channels [C] from the weight (a tensor-parallel rank holds those of its heads)."""
        return self.weight.shape[0]

    def runs_triton(self, x: torch.Tensor) -> bool:
        """Whether this conv runs the Triton kernel for x (then `conv_chunk_gated_delta_rule` can fuse it)."""
        return x.is_cuda and self.backend != "torch" and self.bias is None and self.activation == "silu"

    def reset_parameters(self) -> None:
        # nn.Conv1d's default for a depthwise kernel: fan_in = kernel_size
        bound = 1.0 / math.sqrt(self.kernel_size)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(
        self,
        x: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
        initial_state: torch.Tensor | None = None,
        output_final_state: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [B, T, C] (B == 1 with cu_seqlens int32 [N+1]); initial_state [N, C, W-1] with N = B or
        len(cu_seqlens) - 1. Returns y [B, T, C] and, if asked, final_state [N, C, W-1] holding the last W-1
        inputs of each segment (left-padded with the initial state, or zeros, for short segments)."""
        B, T, C = x.shape
        W = self.kernel_size
        if C != self.channels:
            raise ValueError(f"ShortConvolution: x has {C} channels, the layer was built for {self.channels}")
        if cu_seqlens is not None and B != 1:
            raise ValueError(f"ShortConvolution: with cu_seqlens the input must be packed as [1, T, C], got B={B}")
        if x.is_cuda and self.backend != "torch" and self.bias is None:
            from mom_train.kernels.short_conv import short_conv

            return short_conv(x, self.weight, cu_seqlens, initial_state, output_final_state, self.activation)
        if cu_seqlens is None:
            # a padded batch is B segments of length T laid end to end
            cu_seqlens = torch.arange(B + 1, device=x.device, dtype=torch.int32) * T
            x = x.reshape(1, B * T, C)
        num_seqs = cu_seqlens.numel() - 1
        if initial_state is not None and initial_state.shape != (num_seqs, C, W - 1):
            raise ValueError(f"ShortConvolution: initial_state has shape {tuple(initial_state.shape)}, expected "
                             f"[N, C, W-1] = {(num_seqs, C, W - 1)} (one state per sequence)")
        x2 = x[0]  # [L, C], L = B * T
        L = x2.shape[0]
        starts = cu_seqlens[:-1].long()
        lengths = cu_seqlens[1:].long() - starts
        state = initial_state.transpose(1, 2).to(x.dtype) if initial_state is not None else None  # [N, W-1, C]

        # every output as if the row were one sequence (windows may cross segment starts)
        y = F.conv1d(F.pad(x2.t().unsqueeze(0), (W - 1, 0)), self.weight.unsqueeze(1).to(x.dtype),
                     groups=C).squeeze(0).t()  # [L, C]
        if W > 1:
            # exact outputs for positions 0..W-2 of each segment from windows that respect the start
            rel = torch.arange(W - 1, device=x.device)[:, None] - (W - 1) + torch.arange(W, device=x.device)
            windows = self._gather(x2, state, starts, rel.expand(num_seqs, -1, -1))  # [N, W-1, W, C]
            head = torch.einsum("npwc,cw->npc", windows, self.weight.to(x.dtype))  # [N, W-1, C]
            # write them over the conv output; positions past the end of a short segment go to a spare row L
            p = torch.arange(W - 1, device=x.device)
            rows = torch.where(p < lengths[:, None], starts[:, None] + p, L)  # [N, W-1]
            y = F.pad(y, (0, 0, 0, 1)).index_put((rows.flatten(),), head.flatten(0, 1).to(y.dtype))[:L]
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        if self.activation == "silu":
            y = F.silu(y)

        final_state = None
        if output_final_state:
            # relative positions len-(W-1) .. len-1 of each segment
            rel = lengths[:, None] - (W - 1) + torch.arange(W - 1, device=x.device)  # [N, W-1]
            final_state = self._gather(x2, state, starts, rel).transpose(1, 2)  # [N, C, W-1]
        return y.reshape(B, T, C), final_state

    def _gather(self, x2: torch.Tensor, state: torch.Tensor | None, starts: torch.Tensor,
                rel: torch.Tensor) -> torch.Tensor:
        """Inputs at positions `rel` relative to each segment start; negative positions read the state.

        x2 [L, C]; state [N, W-1, C] or None (zeros); starts [N]; rel [N, ...] -> [N, ..., C].
        """
        W = self.kernel_size
        lead = (starts.shape[0],) + (1,) * (rel.dim() - 1)
        from_x = x2[(starts.view(lead) + rel).clamp(0, x2.shape[0] - 1)]
        if state is None:
            from_state = torch.zeros_like(from_x)
        else:
            rows = torch.arange(starts.shape[0], device=rel.device).view(lead)
            from_state = state[rows, (rel + W - 1).clamp(0, W - 2)]
        return torch.where((rel >= 0).unsqueeze(-1), from_x, from_state)


def conv_fuses_with_delta_rule(convs: tuple[ShortConvolution, ...], x: torch.Tensor, kernel_backend: str,
                               has_cache: bool, use_cache: bool) -> bool:
    """Whether a layer's q/k/v convs and its gated delta rule run as one training function
    (`conv_chunk_gated_delta_rule`, which keeps only the conv inputs): training with gradients, no cache, the
    Triton path for the delta rule and for every conv."""
    return (not has_cache and not use_cache and torch.is_grad_enabled() and kernel_backend != "torch"
            and all(conv.runs_triton(x) for conv in convs))

