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


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype and a.device == b.device)


@contextmanager
def recompute_in_backward(tensor: torch.Tensor, rebuild: Callable[[], torch.Tensor]) -> Iterator[None]:
    """Inside the block, every op that saves `tensor` for backward saves a recipe instead; backward calls
    `rebuild()` (no grad) to get it back. Other saved tensors are kept as usual."""
    if not torch.is_grad_enabled():
        yield
        return
    placeholder = _Rebuild(rebuild)

    def pack(saved: torch.Tensor):
        return placeholder if _same_tensor(saved, tensor) else saved

    def unpack(packed):
        return packed() if packed is placeholder else packed

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
