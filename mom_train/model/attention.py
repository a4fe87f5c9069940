"""Transformer++ attention: RoPE, causal softmax attention, packed documents kept apart, KV cache."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mom_train.config import ModelConfig
from mom_train.model.cache import KVState
from mom_train.model.conv import segment_positions
from mom_train.model.linear import make_linear


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half rotary embedding. x [B, T, H, D]; positions [B or 1, T] (long) -> [B, T, H, D]."""
    D = x.shape[-1]
    inv_freq = theta ** -(torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D)  # [D/2]
    angles = positions.float()[..., None] * inv_freq  # [B, T, D/2]
    angles = torch.cat((angles, angles), -1)[:, :, None, :]  # [B, T, 1, D]
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), -1)
    return (xf * angles.cos() + rotated * angles.sin()).to(x.dtype)


class Attention(nn.Module):
    """x [B, T, D] (or packed [1, T, D] with cu_seqlens) -> (y [B, T, D], KVState | None, {}).

    With cu_seqlens, positions restart at every document start and no token attends across documents.
    With a cache, the new tokens continue at position cache.num_tokens (prefill in chunks or decode).
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        D, H = cfg.hidden_size, cfg.num_heads
        self.layer_idx = layer_idx
        self.head_dim = cfg.head_dim
        self.rope_theta = cfg.rope_theta
        self.init_std = cfg.init_std
        self.q_proj = make_linear(D, H * cfg.head_dim, kind="column")
        self.k_proj = make_linear(D, H * cfg.head_dim, kind="column")
        self.v_proj = make_linear(D, H * cfg.head_dim, kind="column")
        self.o_proj = make_linear(H * cfg.head_dim, D, kind="row")
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for linear in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
            nn.init.normal_(linear.weight, 0.0, self.init_std)

    def forward(
        self,
        x: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
        cache: KVState | None = None,
        use_cache: bool = False,
        context: object | None = None,
    ) -> tuple[torch.Tensor, KVState | None, dict]:
        """x [B, T, D]; context parallelism (context) is not supported: attention would need ring passes of
        keys and values."""
        if context is not None:
            raise ValueError("model.arch=transformer has no context-parallel path (attention over a split "
                             "sequence needs ring attention); set parallel.cp=1")
        B, T, _ = x.shape
        if cu_seqlens is not None and (cache is not None or use_cache):
            raise ValueError("Attention: the KV cache works on a batch [B, T] without cu_seqlens; for decoding "
                             "pass each document as its own row")
        # [B, T, H, D]
        q = self.q_proj(x).unflatten(-1, (-1, self.head_dim))
        k = self.k_proj(x).unflatten(-1, (-1, self.head_dim))
        v = self.v_proj(x).unflatten(-1, (-1, self.head_dim))
        past = cache.num_tokens if cache is not None else 0
        mask = None
        if cu_seqlens is not None:
            seg, pos = segment_positions(cu_seqlens, T)
            positions = pos[None]
            # [T, T] block-diagonal causal: same document and not in the future
            mask = (seg[:, None] == seg[None, :]) & (pos[:, None] >= pos[None, :])
        else:
            positions = torch.arange(past, past + T, device=x.device)[None]
            if past:
                # [T, past + T]: query i sits at position past + i
                mask = torch.arange(past + T, device=x.device)[None, :] <= positions[0, :, None]
        q = apply_rope(q, positions, self.rope_theta)
        k = apply_rope(k, positions, self.rope_theta)
        if cache is not None:
            k = torch.cat((cache.k, k), 1)
            v = torch.cat((cache.v, v), 1)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask, is_causal=mask is None and T > 1)
        y = self.o_proj(o.transpose(1, 2).flatten(-2))
        return y, KVState(k, v) if use_cache else None, {}
