"""Linear + cross entropy without the full [N, V] logits: rows in chunks, gradients computed in the forward.

Per chunk of rows: logits = h W^T in the compute dtype (the autocast dtype under autocast), fp32
logsumexp, loss, then at once d hidden = G W and d W += G^T h (fp32 accumulator), with G = softmax - onehot.
The backward only scales the stored gradients by the incoming scalar gradient.
"""
from __future__ import annotations

import torch

IGNORE_INDEX = -100


def _chunk_loss_and_grad_torch(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [n, V], targets long [n] -> (loss per row fp32 [n], d loss / d logits [n, V] in logits' dtype)."""
    valid = targets != IGNORE_INDEX
    tgt = targets.clamp(min=0)[:, None]
    z = logits.float()
    lse = torch.logsumexp(z, -1)
    loss = (lse - z.gather(1, tgt).squeeze(1)) * valid
    grad = z.sub_(lse[:, None]).exp_()
    grad.scatter_add_(1, tgt, -torch.ones_like(tgt, dtype=grad.dtype))
    grad.mul_(valid[:, None])
    return loss, grad.to(logits.dtype)


def _chunk_loss_and_grad_triton(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from mom_train.kernels.fused_ce.softmax_grad import ce_softmax_grad_

    loss = ce_softmax_grad_(logits, targets, IGNORE_INDEX)
    return loss, logits


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """(hidden [N, D], weight [V, D], targets [N]) -> (loss_sum fp32 scalar, num_valid long scalar)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, compute_dtype, chunk_rows, use_triton, grad_enabled):
        N = hidden.shape[0]
        # under no_grad (eval) needs_input_grad still reflects requires_grad: skip the gradients then
        need_dh = grad_enabled and ctx.needs_input_grad[0]
        need_dw = grad_enabled and ctx.needs_input_grad[1]
        chunk_fn = _chunk_loss_and_grad_triton if use_triton else _chunk_loss_and_grad_torch
        w = weight.to(compute_dtype)
        loss_sum = torch.zeros((), device=hidden.device, dtype=torch.float32)
        dh = torch.empty_like(hidden) if need_dh else None
        dw = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_dw else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, N, chunk_rows):
                h = hidden[start:start + chunk_rows].to(compute_dtype)
                logits = h @ w.t()  # [n, V]
                loss, grad = chunk_fn(logits, targets[start:start + chunk_rows])
                loss_sum += loss.sum()
                if need_dh:
                    dh[start:start + chunk_rows] = grad @ w
                if need_dw:
                    dw += grad.t() @ h
        ctx.save_for_backward(dh, dw)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        num_valid = (targets != IGNORE_INDEX).sum()
        ctx.mark_non_differentiable(num_valid)
        return loss_sum, num_valid

    @staticmethod
    def backward(ctx, grad_loss, grad_count):
        dh, dw = ctx.saved_tensors
        if dh is not None:
            dh = (dh * grad_loss).to(ctx.dtypes[0])
        if dw is not None:
            dw = (dw * grad_loss).to(ctx.dtypes[1])
        return dh, dw, None, None, None, None, None
