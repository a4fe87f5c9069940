"""Data parallelism: how gradients are reduced over the dp x cp ranks (`ParallelDims.grad_group`) each step.

- `DDPGradients`: torch's DistributedDataParallel, its bucketed all-reduces overlapped with the backward of
  the step's last micro-batch (the others skip them);
- `FlatGradients`: every gradient is a view into one flat fp32 buffer (needed by CUDA-graph replay, which
  cannot own .grad tensors, and by ZeRO, which shards it), averaged with one all-reduce after the last
  micro-batch (under ZeRO the sharded optimizer reduces it instead: parallel/zero.py).
Either way the tensor-parallel partial gradients are then summed over tp (parallel/grad.py), so after
`reduce()` every rank holds the gradient of the global loss for its parameters.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mom_train.cuda_graph import FlatGrads
from mom_train.parallel.dims import ParallelDims
from mom_train.parallel.grad import flat_slices, order_for_flat_buffer, sum_partial_grads


class DDPGradients:
    """Gradients in each parameter's own .grad, averaged by DDP over the dp x cp group."""

    flat: FlatGrads | None = None

    def __init__(self, model: nn.Module, params: list[nn.Parameter], dims: ParallelDims):
        self.params = params
        self.dims = dims
        self.module: nn.Module = model
        if dims.grad_size > 1:
            ids = [dims.device.index] if dims.device.type == "cuda" else None
            self.module = DistributedDataParallel(model, device_ids=ids, process_group=dims.grad_group)

    def no_sync(self, sync: bool) -> contextlib.AbstractContextManager:
        """Skip DDP's all-reduce on accumulation micro-batches (sync=False)."""
        if sync or not isinstance(self.module, DistributedDataParallel):
            return contextlib.nullcontext()
        return self.module.no_sync()

    def reduce(self) -> None:
        sum_partial_grads(self.params, self.dims)

    def zero(self) -> None:
        for p in self.params:
            p.grad = None


class FlatGradients:
    """Gradients as views into one buffer laid out [tp-sharded | tp-partial | replicated] (parallel/grad.py),
    averaged over the dp x cp group with one all-reduce and the partial slice summed over tp."""

    def __init__(self, model: nn.Module, params: list[nn.Parameter], dims: ParallelDims, pad_to: int = 1):
        """pad_to: round the buffer up to a multiple (ZeRO shards it evenly over the dp x cp ranks)."""
        self.dims = dims
        self.module = model
        if dims.grad_size > 1:
            # every replica must start from the same weights, as DDP's constructor would ensure
            for p in model.parameters():
                dims.broadcast_(p.data, dims.grad_group)
        self.flat = FlatGrads(order_for_flat_buffer(params), pad_to)
        self.sharded, self.partial = flat_slices(self.flat.params)

    def no_sync(self, sync: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def reduce(self) -> None:
        if not self.flat.attached():
            raise RuntimeError("a parameter's .grad was replaced or set to None; with flat gradients (CUDA graphs) "
                               "gradients must stay in the engine's flat buffer (zero them, do not reassign)")
        buffer = self.flat.buffer
        if self.dims.grad_size > 1:
            self.dims.all_reduce_(buffer, self.dims.grad_group).div_(self.dims.grad_size)
        if self.dims.tp_size > 1 and self.partial.stop > self.partial.start:
            self.dims.all_reduce_(buffer[self.partial], self.dims.tp_group)

    def zero(self) -> None:
        self.flat.zero_()


def build_gradients(model: nn.Module, params: list[nn.Parameter], dims: ParallelDims, cuda_graphs: bool,
                    zero_stage: int) -> DDPGradients | FlatGradients:
    """The data-parallel wrapper of a run: flat gradients (CUDA graphs, or ZeRO sharding over several dp x cp
    ranks, padded for it) or DDP. params: in the optimizer's order (decayed group first)."""
    zero = zero_stage > 0 and dims.grad_size > 1
    if cuda_graphs or zero:
        return FlatGradients(model, params, dims, pad_to=dims.grad_size if zero else 1)
    return DDPGradients(model, params, dims)


def broadcast_parameters(model: nn.Module, dims: ParallelDims) -> None:
    """Make every replica's weights equal to the first of its dp x cp group (tests and resharded loads)."""
    if dims.grad_size > 1:
        with torch.no_grad():
            for p in model.parameters():
                dims.broadcast_(p.data, dims.grad_group)
