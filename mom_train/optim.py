"""AdamW parameter groups, the warmup + cosine LR schedule, and `Engine`: the one seam around the optimizer.

Weight decay: every matrix (linear and conv weights, and the token embedding, which is tied to the output
head by default) is decayed; norm weights, biases, `A_log` and `dt_bias` (per-head decay/step parameters of
the recurrent layers, also flagged `_no_weight_decay` by the model) are not. The train loop only talks to
`Engine` (forward through `engine.model`, `autocast`, `backward`, `no_sync`, `step`, `state_dict`), so ZeRO or
model-parallel engines can replace it later.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mom_train.config import Config, ConfigError, TrainingConfig
from mom_train.distributed import ParallelContext

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


def autocast_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision of the forward pass: auto = bf16 autocast on CUDA, fp32 on CPU. Weights, gradients and
    optimizer state stay fp32 either way (the fp32 master weights are the parameters themselves)."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16":
        raise ConfigError("`training.precision` = 'fp16' needs loss scaling, which the trainer does not implement; "
                          "use bf16 (or auto)")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


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

    def state_dict(self) -> dict:
        return {"lr": self.lr, "warmup": self.warmup, "total": self.total, "min_ratio": self.min_ratio}

    def load_state_dict(self, sd: dict) -> None:
        """The schedule is a pure function of the step; a changed config (e.g. more steps) wins over `sd`."""
        if sd != self.state_dict():
            print(f"note: LR schedule changed since the checkpoint ({sd} -> {self.state_dict()}); "
                  "the current config's schedule applies")


class Engine:
    """Model (DDP-wrapped when dp_size > 1), fused AdamW with grad-norm clipping and a sync-free NaN skip.

    `step()` clips, then applies the update unless the gradient norm or the step's loss is not finite: the
    fused AdamW kernel reads `found_inf` on the device and leaves parameters and moments untouched, so
    skipping costs no host sync. It returns (grad_norm, nonfinite) as device tensors.
    """

    def __init__(self, model: nn.Module, cfg: Config, ctx: ParallelContext):
        self.module = model
        self.ctx = ctx
        self.grad_clip = cfg.training.grad_clip
        if ctx.distributed:
            ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            self.model: nn.Module = DistributedDataParallel(model, device_ids=ids, process_group=ctx.group)
        else:
            self.model = model
        t = cfg.training
        groups = [{k: v for k, v in g.items() if k != "names"} for g in param_groups(model, t.weight_decay)]
        self.optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas), eps=t.eps, fused=True)
        self.schedule = WarmupCosine.from_config(t)
        self.params = [p for g in groups for p in g["params"]]
        self.precision = t.precision
        # fail at build time, not at the first forward
        autocast_context(self.precision, ctx.device)

    def autocast(self) -> contextlib.AbstractContextManager:
        """A fresh autocast context for one forward pass."""
        return autocast_context(self.precision, self.ctx.device)

    def no_sync(self, sync: bool) -> contextlib.AbstractContextManager:
        """Skip the DDP gradient all-reduce on accumulation micro-batches (sync=False)."""
        if sync or not isinstance(self.model, DistributedDataParallel):
            return contextlib.nullcontext()
        return self.model.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def set_lr(self, step: int) -> float:
        lr = self.schedule(step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return lr

    def step(self, loss_sum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip and update. loss_sum: this rank's summed loss of the step (fp32 scalar, device)."""
        max_norm = self.grad_clip if self.grad_clip > 0 else math.inf
        grad_norm = nn.utils.clip_grad_norm_(self.params, max_norm, foreach=True)
        nonfinite = (~torch.isfinite(grad_norm) | ~torch.isfinite(loss_sum)).float()
        # a loss can be non-finite on one rank only; all ranks must take the same decision
        nonfinite = self.ctx.all_reduce_(nonfinite).clamp_(max=1.0)
        self.optimizer.found_inf = nonfinite
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm.detach(), nonfinite

    def state_dict(self) -> dict:
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        self.module.load_state_dict(sd["model"])
        self.optimizer.load_state_dict(sd["optimizer"])
        self.schedule.load_state_dict(sd["schedule"])
