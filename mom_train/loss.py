"""Language-model loss: label shifting over packed documents and the LM head + cross entropy.

Labels follow the Hugging Face convention (labels = input_ids, -100 = ignore) and are shifted here: position t
predicts labels[t + 1], and that target is dropped when t + 1 starts a new segment or t is the last token.
The head + cross entropy is one call, `lm_head_loss`, so that a fused kernel (training on CUDA) and tensor
parallelism (which scores each rank's token shard) can stand in for it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def shift_labels(labels: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Targets [B, T]: targets[:, t] = labels[:, t + 1], or -100 at the last position and wherever t + 1
    starts a segment of cu_seqlens int32 [N+1] (a document never predicts the next one's first token)."""
    T = labels.shape[1]
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    if cu_seqlens is not None:
        # starts[t] = some segment starts at token t (empty segments included); index T is the end
        starts = torch.zeros(T + 1, dtype=torch.bool, device=labels.device)
        starts = starts.index_fill(0, cu_seqlens.long().clamp(max=T), True)
        targets = targets.masked_fill(starts[1:], IGNORE_INDEX)
    return targets


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor,
                         targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain LM head + summed cross entropy: hidden [B, T, D], weight [V, D], targets [B, T] (-100 = ignore)
    -> (loss_sum fp32 scalar, logits [B, T, V])."""
    logits = F.linear(hidden, weight)
    loss_sum = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum")
    return loss_sum, logits


def lm_head_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                 fused: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(loss_sum fp32 scalar, logits [B, T, V] | None) of hidden [B, T, D] against targets [B, T].

    fused: the chunked head + cross entropy that never materialises the logits (training: returns None for
    them); otherwise `linear_cross_entropy`."""
    if fused:
        from mom_train.kernels.fused_ce import fused_linear_cross_entropy

        loss_sum, _ = fused_linear_cross_entropy(hidden.flatten(0, 1), weight, targets.flatten())
        return loss_sum, None
    return linear_cross_entropy(hidden, weight, targets)


def lm_head_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Logits [B, T, V] of hidden [B, T, D] (no labels: evaluation, generation)."""
    return F.linear(hidden, weight)
