"""Fused LM head + cross entropy that never materialises the full [N, vocab] logits."""
from __future__ import annotations

import torch

from mom_train.kernels.backend import resolve_backend
from mom_train.kernels.fused_ce.chunked import IGNORE_INDEX, _FusedLinearCrossEntropy


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_rows: int | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """sum over valid rows of cross_entropy(hidden @ weight^T, targets), computed chunk by chunk.

    hidden [N, D]; weight [V, D]; targets long [N] (-100 = ignore). Returns (loss_sum fp32 scalar,
    num_valid long scalar); equals F.cross_entropy(logits.float(), targets, reduction="sum") on the full
    logits. Logits are computed in the autocast dtype when autocast is on (else hidden's dtype), softmax in
    fp32. Differentiable in hidden and weight. chunk_rows: rows per chunk (default ~2^27 / V, i.e. about
    0.5 GiB of fp32 logits); backend: "triton" computes each chunk's softmax gradient in place (GPU),
    "torch" in plain torch, "auto" = triton on CUDA.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"fused_linear_cross_entropy: expected hidden [N, D] and weight [V, D], got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}; flatten the batch first")
    if targets.shape != hidden.shape[:1] or targets.dtype != torch.long:
        raise ValueError(f"fused_linear_cross_entropy: targets must be long [N] = [{hidden.shape[0]}], got "
                         f"{targets.dtype} {tuple(targets.shape)}")
    use_triton = resolve_backend("fused_linear_cross_entropy", backend, hidden) == "triton"
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    if chunk_rows is None:
        chunk_rows = max(256, (2 ** 27 // weight.shape[0]) // 256 * 256)
    return _FusedLinearCrossEntropy.apply(hidden, weight, targets.contiguous(), compute_dtype, chunk_rows, use_triton,
                                         torch.is_grad_enabled())


def fused_loss_fn(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, None]:
    """Drop-in for `CausalLM.loss_fn`: hidden [B, T, D], weight [V, D], targets [B, T] -> (loss_sum, None)."""
    loss_sum, _ = fused_linear_cross_entropy(hidden.flatten(0, 1), weight, targets.flatten())
    return loss_sum, None


__all__ = ["fused_linear_cross_entropy", "fused_loss_fn", "IGNORE_INDEX"]
