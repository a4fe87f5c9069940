"""Kernels. Public functions take [B, T, H, K] tensors and infer sizes from shapes (see each folder).

Importing this package needs no GPU and no triton: the Triton kernels load on first call.
"""
from mom_train.kernels.gated_delta_rule import (
    chunk_gated_delta_rule,
    chunk_gated_delta_rule_torch,
    fused_recurrent_gated_delta_rule,
    gated_delta_rule,
    naive_recurrent_gated_delta_rule,
)

__all__ = [
    "chunk_gated_delta_rule",
    "chunk_gated_delta_rule_torch",
    "fused_recurrent_gated_delta_rule",
    "gated_delta_rule",
    "naive_recurrent_gated_delta_rule",
]
