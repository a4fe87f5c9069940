"""Decode state of a CausalLM: one state object per layer, batched over sequences.

A layer receives its own entry (None before its first call) and returns the updated one; `CausalLM` stores
it back. Recurrent layers keep fixed-size states (N = batch rows, or packed segments when prefilling with
cu_seqlens); attention keeps growing key/value tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class RecurrentState:
    """State of a linear-attention layer.

    recurrent: [N, H, K, V] fp32 (a MoM layer may add a memory dim, e.g. [N, E+1, H, K, V]);
    conv: the short-convolution states, one [N, C, W-1] per convolved stream (empty without short conv).
    """
    recurrent: torch.Tensor
    conv: tuple[torch.Tensor, ...] = ()


@dataclass
class KVState:
    """Key/value cache of an attention layer: k, v [B, S, H, D] for the S tokens seen so far."""
    k: torch.Tensor
    v: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.k.shape[1]


class Cache:
    """Per-layer states of one model; `cache[i]` is layer i's state object or None."""

    def __init__(self, num_layers: int):
        self.layers: list[Any] = [None] * num_layers

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, index: int) -> Any:
        return self.layers[index]

    def __setitem__(self, index: int, state: Any) -> None:
        self.layers[index] = state
