"""Keep a cheap-to-rebuild activation out of memory: autograd stores a recipe and rebuilds it in backward.

    with recompute_in_backward(y, lambda: swiglu(gate, up)):
        out = down_proj(y)   # down_proj's saved input y is not kept; backward calls the lambda instead

Used where an op saves a tensor that is a cheap function of tensors kept anyway (a gather of rows, an
elementwise activation, a norm output): memory falls by that tensor's size for the price of one memory-bound
launch in backward. The recipe runs under no_grad and must return exactly the saved tensor's values.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch


class _Rebuild:
    """Placeholder autograd keeps instead of the tensor; calling it rebuilds the tensor."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[], torch.Tensor]):
        self.fn = fn

    def __call__(self) -> torch.Tensor:
        with torch.no_grad():
            return self.fn()


@contextmanager
def recompute_in_backward(tensor: torch.Tensor, rebuild: Callable[[], torch.Tensor]) -> Iterator[None]:
    """Inside the block, every op that saves `tensor` (or a view of its memory, e.g. the 2-D view a linear
    takes of a 3-D input) for backward saves a recipe instead; backward calls `rebuild()` (no grad), which
    must return a contiguous tensor like `tensor`, and takes the same view of it. Other saved tensors are
    kept as usual. `tensor` must be contiguous."""
    if not torch.is_grad_enabled():
        yield
        return
    if not tensor.is_contiguous():
        raise ValueError("recompute_in_backward: the tensor must be contiguous so its views can be rebuilt")
    placeholder = _Rebuild(rebuild)
    # autograd keeps these hooks as long as the graph: they must hold plain values, not the tensor
    storage, dtype, base_offset = tensor.untyped_storage().data_ptr(), tensor.dtype, tensor.storage_offset()

    def pack(saved: torch.Tensor):
        if saved.dtype == dtype and saved.untyped_storage().data_ptr() == storage:
            return placeholder, tuple(saved.shape), saved.stride(), saved.storage_offset() - base_offset
        return saved

    def unpack(packed):
        if isinstance(packed, tuple) and packed[0] is placeholder:
            _, shape, stride, offset = packed
            rebuilt = placeholder()
            return rebuilt.as_strided(shape, stride, rebuilt.storage_offset() + offset)
        return packed

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
