"""The one place linear layers are created, so tensor parallelism can swap in sharded versions later.

`kind` says how a tensor-parallel version would split the weight: "column" splits the output features
(q/k/v/gate/up projections), "row" splits the input features (o_proj, down_proj), "replicated" keeps the
full weight on every rank (the MoM router). On one device all three are a plain `nn.Linear`.
"""
from __future__ import annotations

from typing import Literal

from torch import nn

LinearKind = Literal["column", "row", "replicated"]
_KINDS = ("column", "row", "replicated")


def make_linear(in_features: int, out_features: int, bias: bool = False, kind: LinearKind = "column") -> nn.Linear:
    """A linear map [..., in_features] -> [..., out_features]; weight [out_features, in_features]."""
    if kind not in _KINDS:
        raise ValueError(f"make_linear: kind={kind!r} is not one of {_KINDS}; pick how TP would split the weight")
    return nn.Linear(in_features, out_features, bias=bias)
