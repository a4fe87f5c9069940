"""AdamW parameter groups, the warmup + cosine LR schedule, and `Engine`: the one seam around the optimizer.

Weight decay: every matrix (linear and conv weights, and the token embedding, which is tied to the output
head by default) is decayed; norm weights, biases, `A_log` and `dt_bias` (per-head decay/step parameters of
the recurrent layers, also flagged `_no_weight_decay` by the model) are not. The train loop only talks to
`Engine` (`forward_backward` per micro-batch, `step`, `state_dict`), so ZeRO or model-parallel engines can
replace it later. With training.cuda_graphs the micro-batch is replayed from a CUDA graph (`graphed_step.py`):
gradients then live in one flat buffer, and the data-parallel all-reduce runs on it once per step in place of
DDP's bucketed hooks.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

from mom_train.config import Config, ConfigError, TrainingConfig
from mom_train.distributed import ParallelContext
from mom_train.graphed_step import FlatGrads, GraphedMicroBatch, MicroBatchOutputs, autocast_for_capture
from mom_train.parallel.context import ContextParallel

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


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """Mixed precision of the forward pass: auto = bf16 autocast on CUDA, fp32 (None: no autocast) on CPU.
    Weights, gradients and optimizer state stay fp32 either way (the parameters are the master weights)."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16":
        raise ConfigError("`training.precision` = 'fp16' needs loss scaling, which the trainer does not implement; "
                          "use bf16 (or auto)")
    return None if precision == "fp32" else torch.bfloat16


def autocast_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """A fresh autocast context for `precision` (see autocast_dtype)."""
    dtype = autocast_dtype(precision, device)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


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


def build_optimizer(groups: list[dict], t: TrainingConfig, ctx: ParallelContext,
                    zero_stage: int) -> torch.optim.Optimizer:
    """Fused AdamW over the parameter groups; with zero_stage 1 on several ranks, ZeRO stage 1: each rank keeps
    the AdamW moments of and updates only its shard of the parameters (about 1/world of them), then the
    updated shards are broadcast (torch's ZeroRedundancyOptimizer over all ranks, which hold the same
    gradients after the all-reduce). Checkpoints hold the full, consolidated state either way."""
    kwargs = dict(lr=t.lr, betas=tuple(t.betas), eps=t.eps, fused=True)
    if zero_stage == 1 and ctx.distributed:
        return ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, process_group=ctx.group,
                                       **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


class Engine:
    """Model (DDP-wrapped when the run has several ranks, or graphed), fused AdamW (ZeRO stage 1 sharded with
    parallel.zero_stage=1) with grad-norm clipping and a sync-free NaN skip.

    `forward_backward()` runs one micro-batch and accumulates its gradients. `step()` clips, then applies the
    update unless the gradient norm or the step's loss is not finite: the fused AdamW kernel reads `found_inf`
    on the device and leaves parameters and moments untouched, so skipping costs no host sync. It returns
    (grad_norm, nonfinite) as device tensors.
    """

    def __init__(self, model: nn.Module, cfg: Config, ctx: ParallelContext, capture: bool = True):
        """capture=False (tests only): with training.cuda_graphs, run the graphed path's buffers eagerly."""
        self.module = model
        self.ctx = ctx
        t = cfg.training
        self.grad_clip = t.grad_clip
        self.precision = t.precision
        # fail at build time, not at the first forward
        dtype = autocast_dtype(self.precision, ctx.device)
        if t.cuda_graphs and capture and ctx.device.type != "cuda":
            raise ConfigError(f"`training.cuda_graphs` = true needs a CUDA device, but the run is on {ctx.device}; "
                              "set training.cuda_graphs=false (or run.device=cuda on a GPU machine)")
        if ctx.distributed and not t.cuda_graphs:
            ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            self.model: nn.Module = DistributedDataParallel(model, device_ids=ids, process_group=ctx.group)
        else:
            self.model = model
        groups = [{k: v for k, v in g.items() if k != "names"} for g in param_groups(model, t.weight_decay)]
        self.optimizer = build_optimizer(groups, t, ctx, cfg.parallel.zero_stage)
        self.schedule = WarmupCosine.from_config(t)
        self.params = [p for g in groups for p in g["params"]]
        self.flat_grads: FlatGrads | None = None
        self.graphed: GraphedMicroBatch | None = None
        if t.cuda_graphs:
            if ctx.distributed:
                # every rank must hold the same weights, as DDP's constructor would ensure
                for p in model.parameters():
                    ctx.broadcast_(p.data)
            self.flat_grads = FlatGrads(self.params)
            autocast = autocast_for_capture(dtype) if capture else (lambda: self.autocast())
            self.graphed = GraphedMicroBatch(model, self.flat_grads, autocast, capture=capture)

    def forward_backward(self, input_ids: torch.Tensor, labels: torch.Tensor, cu_seqlens: torch.Tensor,
                         ce_scale: float, aux_scale: float, last: bool,
                         context: ContextParallel | None = None) -> MicroBatchOutputs:
        """Forward one packed micro-batch (input_ids, labels long [1, T], cu_seqlens int32 [N+1]) and accumulate
        the gradient of loss_sum * ce_scale + aux_loss * aux_scale. last: the step's final micro-batch (DDP
        all-reduces its gradients). context: the batch is this rank's part of a sequence split over a
        context-parallel group (`shard_batch`; labels are then shifted targets). The returned scalars are only
        valid until the next call."""
        if self.graphed is not None:
            if context is not None:
                raise ValueError("training.cuda_graphs does not capture context-parallel steps")
            return self.graphed(input_ids, labels, cu_seqlens, ce_scale, aux_scale)
        with self.no_sync(sync=last):
            with self.autocast():
                out = self.model(input_ids, cu_seqlens=cu_seqlens, labels=labels, context=context)
            self.backward(out.loss_sum * ce_scale + out.aux_loss * aux_scale)
        load = out.router_load.detach() if out.router_load is not None else None
        return MicroBatchOutputs(out.loss_sum.detach(), out.aux_loss.detach(), load)

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
        if self.flat_grads is not None:
            if not self.flat_grads.attached():
                raise RuntimeError("a parameter's .grad was replaced or set to None; with training.cuda_graphs "
                                   "gradients must stay in the engine's flat buffer (zero them, do not reassign)")
            if self.ctx.distributed:
                # the mean over data-parallel ranks, as DDP would give
                self.ctx.all_reduce_(self.flat_grads.buffer).div_(self.ctx.dp_size)
            grad_norm = self.flat_grads.clip_(max_norm)
        else:
            grad_norm = nn.utils.clip_grad_norm_(self.params, max_norm, foreach=True)
        nonfinite = (~torch.isfinite(grad_norm) | ~torch.isfinite(loss_sum)).float()
        # a loss can be non-finite on one rank only; all ranks must take the same decision
        nonfinite = self.ctx.all_reduce_(nonfinite).clamp_(max=1.0)
        # the AdamW that updates this rank's parameters (under ZeRO, its shard) reads the flag
        getattr(self.optimizer, "optim", self.optimizer).found_inf = nonfinite
        self.optimizer.step()
        if self.flat_grads is not None:
            self.flat_grads.zero_()
        else:
            self.optimizer.zero_grad(set_to_none=True)
        return grad_norm.detach(), nonfinite

    def state_dict(self) -> dict:
        """Model, optimizer and schedule state. Collective under ZeRO (every rank calls it): the optimizer
        shards are gathered on rank 0, the only rank whose "optimizer" entry is set (None elsewhere)."""
        if isinstance(self.optimizer, ZeroRedundancyOptimizer):
            self.optimizer.consolidate_state_dict(to=0)
            optimizer = self.optimizer.state_dict() if self.ctx.is_main else None
        else:
            optimizer = self.optimizer.state_dict()
        return {"model": self.module.state_dict(), "optimizer": optimizer, "schedule": self.schedule.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        self.module.load_state_dict(sd["model"])
        self.optimizer.load_state_dict(sd["optimizer"])
        self.schedule.load_state_dict(sd["schedule"])
