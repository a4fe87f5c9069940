"""AdamW parameter groups and the warmup + cosine LR schedule (the step engine that uses them: engine.py).

Weight decay: every matrix (linear and conv weights, and the token embedding, which is tied to the output
head by default) is decayed; norm weights, biases, `A_log` and `dt_bias` (per-head decay/step parameters of
the recurrent layers, also flagged `_no_weight_decay` by the model) are not.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from mom_train.config import TrainingConfig

NO_DECAY_NAMES = ("A_log", "dt_bias")


def decays(name: str, param: torch.Tensor) -> bool:
    """Whether AdamW applies weight decay to this parameter."""
    last = name.rsplit(".", 1)[-1]
    if getattr(param, "_no_weight_decay", False) or last in NO_DECAY_NAMES or last == "bias" or "norm" in name.lower():
        return False
    return param.ndim >= 2


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed matrices/embeddings and the rest (names kept for inspection)."""
    decay, no_decay = [], []
    decay_names, no_decay_names = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if decays(name, p) else no_decay).append(p)
        (decay_names if decays(name, p) else no_decay_names).append(name)
    return [{"params": decay, "weight_decay": weight_decay, "names": decay_names},
            {"params": no_decay, "weight_decay": 0.0, "names": no_decay_names}]


class WarmupCosine:
    """lr(step): linear warmup to `lr` over `warmup` steps, then cosine down to `lr * min_ratio` at `total`."""

    def __init__(self, lr: float, warmup: int, total: int, min_ratio: float):
        self.lr, self.warmup, self.total, self.min_ratio = lr, warmup, total, min_ratio

    @classmethod
    def from_config(cls, t: TrainingConfig) -> WarmupCosine:
        return cls(t.lr, t.warmup_steps, t.steps, t.min_lr_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.lr * (self.min_ratio + (1.0 - self.min_ratio) * cosine)

    def apply(self, optimizer, step: int) -> float:
        """Set every param group of `optimizer` (anything with `param_groups`) to lr(step); returns it."""
        lr = self(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict:
        return {"lr": self.lr, "warmup": self.warmup, "total": self.total, "min_ratio": self.min_ratio}

    def load_state_dict(self, sd: dict) -> None:
        """The schedule is a pure function of the step; a changed config (e.g. more steps) wins over `sd`."""
        if sd != self.state_dict():
            print(f"note: LR schedule changed since the checkpoint ({sd} -> {self.state_dict()}); "
                  "the current config's schedule applies")
