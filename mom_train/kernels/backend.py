"""Which implementation a kernel op runs: the shared `backend` argument of every op in this package.

"triton" runs the Triton kernel (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 for testing), "torch"
the plain-PyTorch version of the same function, "auto" Triton for CUDA tensors when the package is installed
and the op can take the input, PyTorch otherwise.
"""
from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "torch")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_backend(op: str, backend: str, tensor: torch.Tensor, triton_fits: bool = True) -> str:
    """"triton" or "torch" for `op` on `tensor`; triton_fits: whether the Triton kernel takes this input's sizes.
    Raises with the fix when the requested backend cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if tensor.is_cuda and triton_fits and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise ImportError(f"{op}: backend='triton' needs the triton package: install it, or use backend='torch'")
        if not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"{op}: backend='triton' needs CUDA tensors, got {tensor.device}: use backend='torch' "
                             "(or 'auto') on CPU, or set TRITON_INTERPRET=1 before importing triton to run the "
                             "Triton interpreter")
        if not triton_fits:
            raise ValueError(f"{op}: the Triton kernel does not take this input's sizes; use backend='torch'")
    return backend
