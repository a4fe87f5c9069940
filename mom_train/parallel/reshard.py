"""One checkpoint format for every layout: the full model and optimizer state of a single process.

Saving gathers each tensor-parallel parameter's shards (and its AdamW moments) from the tp ranks onto the
first rank and re-assembles the full tensor (`TPShard`); loading gives every rank its shard of the full
tensor. A run saved at one tensor-parallel size therefore resumes at any other (and in one process: eval,
generate). Parameters without a `tp_shard` are whole on every rank.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from mom_train.parallel.dims import ParallelDims
from mom_train.parallel.tensor import TPShard, shard_tensor, unshard_tensor


def _spec(tensor: torch.Tensor) -> TPShard | None:
    return getattr(tensor, "tp_shard", None)


def _gather_full(local: torch.Tensor, spec: TPShard, dims: ParallelDims) -> torch.Tensor | None:
    """The full tensor on the tp group's first rank (a CPU tensor), None on the others."""
    dst = dist.get_global_rank(dims.tp_group, 0)
    local = local.detach().contiguous()
    parts = [torch.empty_like(local) for _ in range(dims.tp_size)] if dims.tp_rank == 0 else None
    dist.gather(local, parts, dst=dst, group=dims.tp_group)
    if parts is None:
        return None
    return unshard_tensor([p.cpu() for p in parts], spec, local.shape[spec.dim] * dims.tp_size)


def gather_tp_full(local: torch.Tensor, spec: TPShard | None, dims: ParallelDims) -> torch.Tensor | None:
    """A tensor that is this rank's tp shard under `spec` (or whole: spec None) -> the full tensor on the first
    rank of the tp group (None on the others). Collective over the tp group when sharded."""
    if spec is None or dims.tp_size == 1:
        return local
    return _gather_full(local, spec, dims)


def full_model_state(model: nn.Module, dims: ParallelDims) -> dict[str, torch.Tensor] | None:
    """The full state dict (CPU tensors) on the first rank, None elsewhere (collective over the tp group of
    the first rank; every rank calls it)."""
    # only the tp group that holds the first rank takes part (in its gathers)
    if not dims.is_main and (dims.tp_size == 1 or dims.grad_rank != 0):
        return None
    state = {k: v for k, v in model.state_dict(keep_vars=True).items() if isinstance(v, torch.Tensor)}
    out: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        spec = _spec(value)
        if spec is not None and dims.tp_size > 1:
            out[name] = _gather_full(value, spec, dims)
        elif dims.is_main:
            out[name] = value.detach().cpu().clone()
    return out if dims.is_main else None


def load_model_state(model: nn.Module, full: dict[str, torch.Tensor], dims: ParallelDims) -> None:
    """Copy this rank's shard of every tensor of a full state dict into the model (names must match)."""
    state = {k: v for k, v in model.state_dict(keep_vars=True).items() if isinstance(v, torch.Tensor)}
    missing, unexpected = sorted(set(state) - set(full)), sorted(set(full) - set(state))
    if missing or unexpected:
        raise KeyError(f"the checkpoint's model does not match this model: missing {missing[:5]}, unexpected "
                       f"{unexpected[:5]}")
    with torch.no_grad():
        for name, dest in state.items():
            spec = _spec(dest)
            value = full[name] if spec is None else shard_tensor(full[name], spec, dims.tp_rank, dims.tp_size)
            if value.shape != dest.shape:
                raise ValueError(f"checkpoint tensor {name} has shape {tuple(value.shape)} for this rank, the model "
                                 f"{tuple(dest.shape)}")
            dest.copy_(value)


def full_optimizer_state(local: dict | None, params: list[nn.Parameter], dims: ParallelDims) -> dict | None:
    """A torch optimizer state dict whose per-parameter tensors of parameter shape are this rank's tp shards
    -> the full one on the first rank (None elsewhere). Called by the ranks of the first rank's tp group."""
    if dims.tp_size == 1:
        return local if dims.is_main else None
    out = {"param_groups": local["param_groups"], "state": {}}
    for index, param in enumerate(params):
        spec = _spec(param)
        entry = local["state"].get(index)
        if entry is None:
            continue
        full_entry = {}
        for key, value in entry.items():
            if spec is not None and isinstance(value, torch.Tensor) and value.shape == param.shape:
                full_entry[key] = _gather_full(value, spec, dims)
            else:
                full_entry[key] = value.cpu() if isinstance(value, torch.Tensor) else value
        out["state"][index] = full_entry
    return out if dims.is_main else None


def local_optimizer_state(full: dict, params: list[nn.Parameter], dims: ParallelDims) -> dict:
    """Inverse of `full_optimizer_state`: this rank's shard of every per-parameter tensor."""
    if dims.tp_size == 1:
        return full
    state = {}
    for index, entry in full["state"].items():
        spec = _spec(params[index])
        state[index] = {key: shard_tensor(value, spec, dims.tp_rank, dims.tp_size)
                        if spec is not None and isinstance(value, torch.Tensor) and value.dim() > 0 else value
                        for key, value in entry.items()}
    return {"param_groups": full["param_groups"], "state": state}
