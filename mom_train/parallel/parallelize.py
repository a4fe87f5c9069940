"""`parallelize`: everything that shards or wraps a model for training, in one place and one order.

The model arrives plain (built identically on every rank from the run's seed, on the host) and leaves
1. tensor (+ sequence) parallel: heads and the MLP split over tp in place (parallel/tensor.py), before it is
   moved to the device, so every rank keeps exactly its shard of the one-process initialisation;
2. context-parallel ready: nothing is installed (each micro-batch carries its `ContextParallel`, built by
   `shard_batch`), but the model must have a context-parallel path;
3. recomputing each block in backward when training.activation_checkpointing is on;
4. on its device, wrapped for data parallelism over the dp x cp ranks (parallel/data.py): DDP, or flat
   gradients for CUDA-graph replay and ZeRO; with the DeepSpeed engine, DeepSpeed wraps it (engine.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from mom_train.config import Config, ConfigError
from mom_train.optim import param_groups
from mom_train.parallel.data import DDPGradients, FlatGradients, build_gradients
from mom_train.parallel.dims import ParallelDims
from mom_train.parallel.tensor import apply_tensor_parallel


@dataclass
class Parallelized:
    """model: the plain model (its tp shard), for state dicts and evaluation; gradients: the data-parallel
    wrapper, whose `module` runs the training forward (None when DeepSpeed wraps the model)."""
    model: nn.Module
    gradients: DDPGradients | FlatGradients | None


def parallelize(model: nn.Module, dims: ParallelDims, cfg: Config) -> Parallelized:
    """Apply tensor/sequence, context and data parallelism and activation recompute to a CausalLM (see the
    module doc for the order)."""
    # 1. tensor + sequence parallelism (on the host, from the full initialisation)
    if dims.tp_size > 1:
        apply_tensor_parallel(model, dims)
    # 2. context parallelism: the layers pass states across ranks when a micro-batch carries a context
    if dims.cp_size > 1 and cfg.model.arch == "transformer":
        raise ConfigError("model.arch=transformer has no context-parallel path (attention over a split sequence "
                          "needs ring attention); set parallel.cp=1")
    # 3. activation recompute
    model.activation_checkpointing = cfg.training.activation_checkpointing
    # 4. data parallelism, on the device
    model.to(dims.device)
    if cfg.parallel.uses_deepspeed:
        # DeepSpeed reduces and shards the gradients itself (engine.DeepSpeedEngine)
        return Parallelized(model, None)
    params = [p for g in param_groups(model, 0.0) for p in g["params"]]
    return Parallelized(model, build_gradients(model, params, dims, cfg.training.cuda_graphs, cfg.parallel.zero_stage))
