"""torch.distributed set-up and tear-down, and the small `ParallelContext` passed to everything that needs ranks.

Launch with torchrun (it sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); without it the run is
one process and no process group is created. Backend: NCCL when the run uses CUDA, gloo on CPU. A second,
gloo process group (`cpu_group`) carries host-side agreements (global token counts, the preemption flag) so
they never wait on the GPU stream. There is no module-level state: the context object is the only handle.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from mom_train.config import Config, ConfigError


@dataclass
class ParallelContext:
    """Ranks of this process. The world is dp_size x cp_size ranks, rank = dp_rank * cp_size + cp_rank: the
    cp_size consecutive ranks of one context-parallel group split each micro-batch's sequence between them
    (they load the same data), and the dp_size groups see different data."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    dp_rank: int = 0
    dp_size: int = 1
    cp_rank: int = 0
    cp_size: int = 1
    device: torch.device = torch.device("cpu")
    # None when the run is a single process
    group: dist.ProcessGroup | None = None
    cpu_group: dist.ProcessGroup | None = None
    # this rank's context-parallel group (None when cp_size == 1)
    cp_group: dist.ProcessGroup | None = None
    # whether this context created the default process group (and so destroys it in teardown)
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def sum_int(self, value: int) -> int:
        """Sum a host integer over all ranks (gloo, never touches the GPU)."""
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, group=self.cpu_group)
        return int(t[0])

    def max_int(self, value: int) -> int:
        """Maximum of a host integer over all ranks (gloo)."""
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.cpu_group)
        return int(t[0])

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place sum over all ranks of a tensor on `self.device` (asynchronous on the GPU stream)."""
        if self.distributed:
            dist.all_reduce(tensor, group=self.group)
        return tensor

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """In-place copy of rank `src`'s tensor to every rank (on `self.device`)."""
        if self.distributed:
            dist.broadcast(tensor, src=src, group=self.group)
        return tensor

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.cpu_group)


def resolve_device(cfg: Config, local_rank: int = 0) -> torch.device:
    """run.device auto -> cuda:<local_rank> when CUDA is available, else cpu."""
    want = cfg.run.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("`run.device` = 'cuda' but CUDA is not available; use run.device=auto or cpu")
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(cfg: Config, timeout_s: float = 1800.0) -> ParallelContext:
    """Create the process groups from the torchrun environment (or reuse an existing default group)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():
        world_size, rank = dist.get_world_size(), dist.get_rank()
    check_supported(cfg)
    cp = cfg.parallel.cp
    if world_size % cp:
        raise ConfigError(f"world size {world_size} is not divisible by `parallel.cp` = {cp}; launch a multiple "
                          "of parallel.cp processes")
    device = resolve_device(cfg, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    ctx = ParallelContext(rank=rank, world_size=world_size, local_rank=local_rank, dp_rank=rank // cp,
                          dp_size=world_size // cp, cp_rank=rank % cp, cp_size=cp, device=device)
    if world_size == 1:
        return ctx
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
        ctx.owns_group = True
    ctx.group = dist.group.WORLD
    is_gloo = dist.get_backend() == "gloo"
    ctx.cpu_group = ctx.group if is_gloo else dist.new_group(backend="gloo")
    if cp > 1:
        # every rank creates every group, in the same order; it keeps its own
        for first in range(0, world_size, cp):
            group = dist.new_group(list(range(first, first + cp)))
            if first == rank - ctx.cp_rank:
                ctx.cp_group = group
    return ctx


def check_supported(cfg: Config) -> None:
    """Refuse parallel settings the trainer does not implement, naming the fix."""
    p = cfg.parallel
    if p.tp != 1:
        raise ConfigError(f"parallel.tp={p.tp}: tensor parallelism is not available yet; training runs "
                          "data-parallel (DDP), context-parallel (parallel.cp) and with ZeRO stage 1, so set "
                          "parallel.tp=1")
    if p.zero_stage > 1:
        raise ConfigError(f"parallel.zero_stage={p.zero_stage}: ZeRO stages 2 and 3 (sharded gradients and "
                          "parameters) are not available yet; use parallel.zero_stage=1 (sharded optimizer "
                          "state) or 0")


def teardown(ctx: ParallelContext, clean: bool = True) -> None:
    """Destroy the process groups this context created. clean: every rank got here normally, so wait for the
    others first (a rank that closes its gloo connections while a peer still reads them aborts that peer);
    after an error the peers may never arrive, so no waiting."""
    if ctx.owns_group and dist.is_initialized():
        if clean:
            ctx.barrier()
        dist.destroy_process_group()
        ctx.owns_group = False
