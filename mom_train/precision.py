"""Mixed precision of the forward pass, shared by training, evaluation and generation.

Weights, gradients and optimizer state stay fp32 either way (the parameters are the master weights); only the
forward's matmuls run in bf16 under autocast.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from mom_train.config import ConfigError


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """training.precision -> the autocast dtype: auto = bf16 on CUDA, fp32 (None: no autocast) on CPU."""
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


def autocast_for_capture(dtype: torch.dtype | None) -> Callable[[], contextlib.AbstractContextManager]:
    """Autocast factory for CUDA-graph captured steps: the weight-cast cache must be off while capturing."""
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast("cuda", dtype=dtype, cache_enabled=False)
