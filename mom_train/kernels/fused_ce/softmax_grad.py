"""Triton cross-entropy over a chunk of logits: per-row loss, and the logits overwritten by their gradient.

For a row with target y (valid unless -100): loss = logsumexp(z) - z_y and dloss/dz = softmax(z) - onehot(y)
(zero for ignored rows). Two passes over the row (online max/sum, then the gradient), fp32 math, the
gradient stored in the logits' dtype in place, so a chunk costs one [n, V] buffer.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _ce_softmax_grad_kernel(logits, targets, loss, V, stride_l, ignore_index, BV: tl.constexpr):
    row = tl.program_id(0)
    base = logits + row.to(tl.int64) * stride_l
    tgt = tl.load(targets + row)
    valid = tgt != ignore_index
    # per-lane running max and sum; masked lanes hold a finite floor and add nothing
    m = tl.full([BV], -1e30, dtype=tl.float32)
    s = tl.zeros([BV], dtype=tl.float32)
    for start in range(0, V, BV):
        cols = start + tl.arange(0, BV)
        mask = cols < V
        z = tl.load(base + cols, mask=mask, other=-1e30).to(tl.float32)
        m_new = tl.maximum(m, z)
        s = s * tl.exp(m - m_new) + tl.where(mask, tl.exp(z - m_new), 0.0)
        m = m_new
    m_row = tl.max(m, axis=0)
    lse = m_row + tl.log(tl.sum(s * tl.exp(m - m_row), axis=0))
    tgt_safe = tl.where(valid, tgt, 0)
    z_tgt = tl.load(base + tgt_safe).to(tl.float32)
    tl.store(loss + row, tl.where(valid, lse - z_tgt, 0.0))
    scale = tl.where(valid, 1.0, 0.0)
    for start in range(0, V, BV):
        cols = start + tl.arange(0, BV)
        mask = cols < V
        z = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        grad = (tl.exp(z - lse) - tl.where(cols == tgt_safe, 1.0, 0.0)) * scale
        tl.store(base + cols, grad.to(logits.dtype.element_ty), mask=mask)


def ce_softmax_grad_(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """logits [n, V] (unit column stride; overwritten with d loss / d logits), targets long [n].
    Returns the per-row loss fp32 [n] (0 for ignored rows)."""
    n, V = logits.shape
    loss = torch.empty(n, device=logits.device, dtype=torch.float32)
    BV = min(4096, triton.next_power_of_2(V))
    _ce_softmax_grad_kernel[(n,)](logits, targets, loss, V, logits.stride(0), ignore_index, BV=BV,
                                  num_warps=8 if BV >= 2048 else 4)
    return loss
