"""The step engine: one seam between the training loop and the model, its gradients and the optimizer.

`forward_backward()` runs one micro-batch and accumulates its gradients (through the data-parallel wrapper
that `parallelize` chose: DDP, or a flat buffer replayed by CUDA graphs); `step()` reduces the gradients,
clips them by their global norm and applies fused AdamW unless the norm or the step's loss is not finite
(the AdamW kernel reads `found_inf` on the device and leaves parameters and moments untouched, so skipping
costs no host sync). With parallel.zero_stage 1 or 2 each of the dp x cp ranks keeps the moments of, and
updates, only its shard of the parameters (parallel/zero.py).

`state_dict()` / `load_state_dict()` speak the one checkpoint format: the full, consolidated model and
optimizer state of a single process, whatever the tensor-parallel size or ZeRO stage (parallel/reshard.py).
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from mom_train.config import Config, ConfigError, TrainingConfig
from mom_train.cuda_graph import GraphedMicroBatch, MicroBatchOutputs
from mom_train.kernels.cp import ContextParallel
from mom_train.optim import WarmupCosine, param_groups
from mom_train.parallel.dims import ParallelDims
from mom_train.parallel.grad import clip_coefficient, clip_grads_, flat_grad_norm
from mom_train.parallel.parallelize import Parallelized
from mom_train.parallel.reshard import full_model_state, full_optimizer_state, load_model_state, local_optimizer_state
from mom_train.parallel.zero import ZeroAdamW
from mom_train.precision import autocast_context, autocast_dtype, autocast_for_capture


def build_optimizer(groups: list[dict], t: TrainingConfig, dims: ParallelDims, zero_stage: int,
                    gradients) -> torch.optim.Optimizer | ZeroAdamW:
    """Fused AdamW over the parameter groups; with zero_stage 1 or 2 and several dp x cp ranks, sharded over
    them (ZeroAdamW, on the flat gradient buffer `gradients.flat`)."""
    if zero_stage in (1, 2) and dims.grad_size > 1:
        decayed = {id(p) for p in groups[0]["params"]}
        return ZeroAdamW(gradients.flat, decayed, dims, zero_stage, lr=t.lr, betas=tuple(t.betas), eps=t.eps,
                         weight_decay=groups[0]["weight_decay"])
    return torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas), eps=t.eps, fused=True)


class Engine:
    """Model (parallelized), fused AdamW with global-norm clipping and a sync-free NaN skip, LR schedule."""

    def __init__(self, parallel: Parallelized, cfg: Config, dims: ParallelDims, capture: bool = True):
        """capture=False (tests only): with training.cuda_graphs, run the graphed path's buffers eagerly."""
        self.module = parallel.model
        self.gradients = parallel.gradients
        self.dims = dims
        t = cfg.training
        self.grad_clip = t.grad_clip
        self.precision = t.precision
        # fail at build time, not at the first forward
        dtype = autocast_dtype(self.precision, dims.device)
        if t.cuda_graphs and capture and dims.device.type != "cuda":
            raise ConfigError(f"`training.cuda_graphs` = true needs a CUDA device, but the run is on {dims.device}; "
                              "set training.cuda_graphs=false (or run.device=cuda on a GPU machine)")
        groups = param_groups(self.module, t.weight_decay)
        self.param_names = [n for g in groups for n in g["names"]]
        groups = [{k: v for k, v in g.items() if k != "names"} for g in groups]
        self.params = [p for g in groups for p in g["params"]]
        self.param_index = {id(p): i for i, p in enumerate(self.params)}
        self.optimizer = build_optimizer(groups, t, dims, cfg.parallel.zero_stage, self.gradients)
        self.schedule = WarmupCosine.from_config(t)
        self.graphed: GraphedMicroBatch | None = None
        if t.cuda_graphs:
            autocast = autocast_for_capture(dtype) if capture else (lambda: self.autocast())
            self.graphed = GraphedMicroBatch(self.module, self.gradients.flat, autocast, capture=capture)

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
        with self.gradients.no_sync(sync=last):
            with self.autocast():
                out = self.gradients.module(input_ids, cu_seqlens=cu_seqlens, labels=labels, context=context)
            (out.loss_sum * ce_scale + out.aux_loss * aux_scale).backward()
        load = out.router_load.detach() if out.router_load is not None else None
        return MicroBatchOutputs(out.loss_sum.detach(), out.aux_loss.detach(), load)

    def autocast(self) -> contextlib.AbstractContextManager:
        """A fresh autocast context for one forward pass."""
        return autocast_context(self.precision, self.dims.device)

    def evaluation(self) -> contextlib.AbstractContextManager:
        """Around evaluating `module` directly: nothing to do (its parameters are whole)."""
        return contextlib.nullcontext()

    def set_lr(self, step: int) -> float:
        return self.schedule.apply(self.optimizer, step)

    def step(self, loss_sum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reduce, clip and update. loss_sum: this rank's summed loss of the step (fp32 scalar, device).
        Returns (grad_norm, nonfinite) device scalars, equal on every rank."""
        max_norm = self.grad_clip if self.grad_clip > 0 else math.inf
        zero = isinstance(self.optimizer, ZeroAdamW)
        if zero:
            grad_norm = self.optimizer.reduce_and_clip(max_norm)
        else:
            self.gradients.reduce()
            grad_norm = self._clip(max_norm)
        nonfinite = (~torch.isfinite(grad_norm) | ~torch.isfinite(loss_sum)).float()
        # a loss can be non-finite on one rank only; all ranks must take the same decision
        nonfinite = self.dims.all_reduce_(nonfinite).clamp_(max=1.0)
        # the fused AdamW reads the flag on the device and leaves parameters and moments untouched
        if zero:
            self.optimizer.step(nonfinite)
            self.optimizer.zero_grad()
        else:
            self.optimizer.found_inf = nonfinite
            self.optimizer.step()
            self.gradients.zero()
        return grad_norm.detach(), nonfinite

    def _clip(self, max_norm: float) -> torch.Tensor:
        flat = self.gradients.flat
        if flat is None:
            return clip_grads_(self.params, max_norm, self.dims)
        if self.dims.tp_size == 1:
            return flat.clip_(max_norm)
        norm = flat_grad_norm(flat.buffer, self.gradients.sharded, self.dims)
        if max_norm < math.inf:
            flat.buffer.mul_(clip_coefficient(norm, max_norm).to(flat.buffer.dtype))
        return norm

    def state_dict(self) -> dict:
        """The full model and optimizer state and the schedule (collective: every rank calls it). Only the
        first rank's "model" and "optimizer" entries are set (None elsewhere)."""
        if isinstance(self.optimizer, ZeroAdamW):
            # the first rank of each dp x cp group gathers its tp shard's whole moments
            local = self.optimizer.full_state_dict(self.param_index)
        else:
            local = self.optimizer.state_dict()
        optimizer = full_optimizer_state(local, self.params, self.dims) if self.dims.grad_rank == 0 else None
        return {"model": full_model_state(self.module, self.dims), "optimizer": optimizer,
                "schedule": self.schedule.state_dict()}

    def load_model(self, model: dict) -> None:
        """Load a full (one-process) model state dict, keeping this rank's shards."""
        load_model_state(self.module, model, self.dims)

    def load_state_dict(self, sd: dict) -> None:
        """Load full (consolidated) model and optimizer state, keeping this rank's shards."""
        self.load_model(sd["model"])
        local = local_optimizer_state(sd["optimizer"], self.params, self.dims)
        if isinstance(self.optimizer, ZeroAdamW):
            self.optimizer.load_full_state_dict(local, self.param_index)
        else:
            self.optimizer.load_state_dict(local)
        self.schedule.load_state_dict(sd["schedule"])


class DeepSpeedEngine:
    """`Engine`'s interface on DeepSpeed (parallel.engine=deepspeed, or ZeRO stage 3): see
    parallel/deepspeed.py. Micro-batches are accumulated by DeepSpeed (gradient_accumulation_steps = the run's
    accumulation); the boundary step is taken in `step()`, after the tensor-parallel partial gradients are
    summed and the loss is checked, so the loop keeps its normalisation, NaN policy and metrics."""

    def __init__(self, parallel: Parallelized, cfg: Config, dims: ParallelDims, grad_accum: int, log=print):
        from mom_train.parallel.deepspeed import (DeepSpeedModel, GuardedAdamW, MegatronLayout, deepspeed_config,
                                                  import_deepspeed, materialize_optimizer_state,
                                                  register_stage3_externals, tag_tensor_parallel)

        deepspeed = import_deepspeed(dims.device)
        t = cfg.training
        self.module, self.dims = parallel.model, dims
        self.precision = t.precision
        self.stage = cfg.parallel.zero_stage
        self.graphed = None
        tag_tensor_parallel(self.module)
        groups = param_groups(self.module, t.weight_decay)
        groups = [{k: v for k, v in g.items() if k != "names"} for g in groups]
        self.params = [p for g in groups for p in g["params"]]
        self.param_index = {id(p): i for i, p in enumerate(self.params)}
        self.partial = [p for p in self.params if getattr(p, "tp_partial", False)]
        # the parameter groups' sizes in the one-process optimizer's numbering (DeepSpeed flattens the groups)
        self.group_sizes = [len(g["params"]) for g in groups]
        self.optimizer = GuardedAdamW(groups, lr=t.lr, betas=tuple(t.betas), eps=t.eps)
        self.schedule = WarmupCosine.from_config(t)
        wrapper = DeepSpeedModel(self.module)
        self.ds, _, _, _ = deepspeed.initialize(
            model=wrapper, optimizer=self.optimizer, config=deepspeed_config(cfg, dims, grad_accum, log),
            mpu=MegatronLayout(dims) if dims.distributed else None, dist_init_required=False)
        if self.stage == 3:
            register_stage3_externals(wrapper)
        # AdamW's state exists from the start (DeepSpeed links each parameter to its shard of the moments at the
        # first step, and would miss the moments of a parameter group not stepped yet)
        materialize_optimizer_state(self.ds, torch.zeros(()))

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast_context(self.precision, self.dims.device)

    def evaluation(self) -> contextlib.AbstractContextManager:
        """Around evaluating `module` directly: under stage 3 its parameters are gathered whole for the
        evaluation (each rank then holds the whole model for a moment)."""
        if self.stage != 3:
            return contextlib.nullcontext()
        from deepspeed.runtime.zero import GatheredParameters

        return GatheredParameters(list(self.module.parameters()))

    def forward_backward(self, input_ids: torch.Tensor, labels: torch.Tensor, cu_seqlens: torch.Tensor,
                         ce_scale: float, aux_scale: float, last: bool,
                         context: ContextParallel | None = None) -> MicroBatchOutputs:
        """As `Engine.forward_backward`; a micro-batch that is not the step's last is a DeepSpeed micro-step."""
        with self.autocast():
            loss_sum, aux_loss, load = self.ds(input_ids, cu_seqlens=cu_seqlens, labels=labels, context=context)
        self.ds.backward(loss_sum * ce_scale + aux_loss * aux_scale, scale_wrt_gas=False)
        if not last:
            self.ds.step()
        return MicroBatchOutputs(loss_sum.detach(), aux_loss.detach(), load.detach() if load is not None else None)

    def set_lr(self, step: int) -> float:
        return self.schedule.apply(self.optimizer, step)

    def step(self, loss_sum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The accumulation boundary: tp-partial gradients summed over tp, then DeepSpeed's reduce, clip and
        GuardedAdamW step (skipped when the loss or a gradient is not finite on any rank)."""
        if self.dims.tp_size > 1:
            self._sum_partial_grads()
        self.optimizer.nonfinite = (~torch.isfinite(loss_sum)).float()
        self.ds.step()
        norm = self.ds.get_global_grad_norm()
        device = loss_sum.device
        grad_norm = torch.as_tensor(norm if norm is not None else math.nan, dtype=torch.float32).to(device)
        return grad_norm, self.optimizer.skipped.to(device)

    def _sum_partial_grads(self) -> None:
        from deepspeed.utils import safe_get_full_grad, safe_set_full_grad

        for p in self.partial:
            grad = safe_get_full_grad(p)
            if grad is None:
                continue
            grad = grad.clone()
            torch.distributed.all_reduce(grad, group=self.dims.tp_group)
            safe_set_full_grad(p, grad)

    def state_dict(self) -> dict:
        """The one-process model and optimizer state (collective; set on the first rank only) and the schedule."""
        from mom_train.parallel.deepspeed import full_moment, full_parameter, optimizer_step_count
        from mom_train.parallel.reshard import gather_tp_full

        named = list(self.module.named_parameters())
        model = {}
        for name, p in named:
            value = gather_tp_full(full_parameter(p), getattr(p, "tp_shard", None), self.dims)
            if self.dims.is_main:
                model[name] = value.detach().cpu().clone()
        step = optimizer_step_count(self.ds)
        state = {}
        for i, p in enumerate(self.params):
            moments = {key: full_moment(p, key, self.ds) for key in ("exp_avg", "exp_avg_sq")}
            if any(m is None for m in moments.values()):
                continue
            moments = {k: gather_tp_full(v, getattr(p, "tp_shard", None), self.dims) for k, v in moments.items()}
            if self.dims.is_main:
                state[i] = {"step": step.clone(), **{k: v.detach().cpu().clone() for k, v in moments.items()}}
        groups, start = [], 0
        for g, num in zip(self.optimizer.param_groups, self.group_sizes):
            hyper = {k: v for k, v in g.items() if k not in ("params", "found_inf")}
            groups.append({**hyper, "params": list(range(start, start + num))})
            start += num
        optimizer = {"state": state, "param_groups": groups} if self.dims.is_main else None
        return {"model": model if self.dims.is_main else None, "optimizer": optimizer,
                "schedule": self.schedule.state_dict()}

    def _local(self, value: torch.Tensor, p: nn.Parameter) -> torch.Tensor:
        """This tp rank's part of a full tensor of parameter p's shape."""
        from mom_train.parallel.tensor import shard_tensor

        spec = getattr(p, "tp_shard", None)
        return value if spec is None else shard_tensor(value, spec, self.dims.tp_rank, self.dims.tp_size)

    def load_model(self, model: dict) -> None:
        """Load a full (one-process) model state dict into the model and DeepSpeed's fp32 master copy."""
        from mom_train.parallel.deepspeed import set_parameter

        named = dict(self.module.named_parameters())
        missing = sorted(set(named) - set(model))
        if missing:
            raise KeyError(f"the checkpoint's model lacks {missing[:5]}")
        for name, p in named.items():
            set_parameter(p, self._local(model[name], p), self.dims)

    def load_state_dict(self, sd: dict) -> None:
        from mom_train.parallel.deepspeed import materialize_optimizer_state, set_moment

        self.load_model(sd["model"])
        states = sd["optimizer"]["state"]
        if states:
            materialize_optimizer_state(self.ds, next(iter(states.values()))["step"])
            for i, p in enumerate(self.params):
                if i in states:
                    for key in ("exp_avg", "exp_avg_sq"):
                        set_moment(p, key, self._local(states[i][key], p), self.ds)
        self.schedule.load_state_dict(sd["schedule"])


def build_engine(parallel: Parallelized, cfg: Config, dims: ParallelDims, grad_accum: int,
                 log=print) -> Engine | DeepSpeedEngine:
    """Our engine, or DeepSpeed's for parallel.engine=deepspeed and ZeRO stage 3."""
    if cfg.parallel.uses_deepspeed:
        return DeepSpeedEngine(parallel, cfg, dims, grad_accum, log)
    return Engine(parallel, cfg, dims)
