"""The rank layout of a run: sizes, ranks and process groups of data, context and tensor parallelism.

Launch with torchrun (it sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); without it the run is
one process and no process group is created. Backend: NCCL when the run uses CUDA, gloo on CPU.

world = dp x cp x tp, laid out by megatron-core's `parallel_state` with tp innermost, then cp, then dp:
rank = (dp_rank * cp + cp_rank) * tp + tp_rank. The tp ranks of one group hold head shards of the same
rows; the cp ranks of one group hold consecutive parts of the same packed sequences; the dp groups see
different data. Gradient means and ZeRO shards run over the dp x cp ranks that share a tp rank (`grad_group`),
never over tp. A second, gloo group over every rank (`cpu_group`) carries host-side agreements (token counts,
the preemption flag) so they never wait on the GPU stream.

`ParallelDims` is the only handle on the groups: nothing else keeps process groups. megatron-core's global
state is set up and torn down here, for its tensor-parallel layers and mappings.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from mom_train.config import Config, ConfigError


@dataclass
class ParallelDims:
    """Sizes, ranks and process groups of this process (groups are None in a single-process run)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    dp_rank: int = 0
    dp_size: int = 1
    cp_rank: int = 0
    cp_size: int = 1
    tp_rank: int = 0
    tp_size: int = 1
    # tensor parallelism keeps the residual stream, norms and loss on sequence shards (Megatron SP)
    sequence_parallel: bool = False
    device: torch.device = torch.device("cpu")
    world_group: dist.ProcessGroup | None = None
    cpu_group: dist.ProcessGroup | None = None
    # the dp x cp ranks of this tp rank: gradient means, ZeRO shards
    grad_group: dist.ProcessGroup | None = None
    cp_group: dist.ProcessGroup | None = None
    tp_group: dist.ProcessGroup | None = None
    # whether this object created the default process group (and so destroys it in teardown)
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def grad_size(self) -> int:
        """Ranks over which gradients are averaged (dp x cp)."""
        return self.dp_size * self.cp_size

    @property
    def grad_rank(self) -> int:
        """This rank's index in `grad_group`; also the index of its data/RNG state in a checkpoint."""
        return self.dp_rank * self.cp_size + self.cp_rank

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

    def all_reduce_(self, tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
        """In-place sum of a tensor on `self.device` over `group` (default: every rank); asynchronous on the
        GPU stream. A no-op in a single-process run."""
        if self.distributed:
            dist.all_reduce(tensor, group=group if group is not None else self.world_group)
        return tensor

    def broadcast_(self, tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
        """In-place copy of the first rank's tensor of `group` (default: every rank) to all of its ranks."""
        if self.distributed:
            group = group if group is not None else self.world_group
            dist.broadcast(tensor, src=dist.get_global_rank(group, 0), group=group)
        return tensor

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.cpu_group)

    def describe(self) -> str:
        """The layout in one line, e.g. 'dp 2 x cp 1 x tp 2 (sequence parallel)'."""
        sp = " (sequence parallel)" if self.sequence_parallel else ""
        return f"dp {self.dp_size} x cp {self.cp_size} x tp {self.tp_size}{sp}"


def resolve_device(cfg: Config, local_rank: int = 0) -> torch.device:
    """run.device auto -> cuda:<local_rank> when CUDA is available, else cpu."""
    want = cfg.run.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("`run.device` = 'cuda' but CUDA is not available; use run.device=auto or cpu")
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def sequence_parallel_enabled(cfg: Config) -> bool:
    """parallel.sequence_parallel, where auto = on whenever tp > 1."""
    p = cfg.parallel
    return p.tp > 1 and p.sequence_parallel in ("auto", True)


def check_layout(cfg: Config, world_size: int) -> None:
    """world = dp x cp x tp, with a message naming the fix."""
    tp, cp = cfg.parallel.tp, cfg.parallel.cp
    if world_size % (tp * cp):
        raise ConfigError(f"world size {world_size} is not divisible by `parallel.tp` x `parallel.cp` = {tp} x {cp}; "
                          f"launch a multiple of {tp * cp} processes (e.g. torchrun --nproc_per_node={tp * cp})")


def init_parallel(cfg: Config, timeout_s: float = 1800.0) -> ParallelDims:
    """Create the process groups from the torchrun environment (or reuse an existing default group)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():
        world_size, rank = dist.get_world_size(), dist.get_rank()
    check_layout(cfg, world_size)
    device = resolve_device(cfg, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    tp, cp = cfg.parallel.tp, cfg.parallel.cp
    dims = ParallelDims(rank=rank, world_size=world_size, local_rank=local_rank, dp_size=world_size // (tp * cp),
                        cp_size=cp, tp_size=tp, sequence_parallel=sequence_parallel_enabled(cfg), device=device)
    if world_size == 1:
        return dims
    if tp > 1 and device.type == "cpu" and torch.cuda.is_available():
        raise ConfigError("`parallel.tp` > 1 on the CPU needs a CPU-only build of torch (megatron-core's "
                          "tensor-parallel mappings allocate on the current CUDA device when one exists); "
                          "use run.device=cuda")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
        dims.owns_group = True
    dims.world_group = dist.group.WORLD
    dims.cpu_group = dims.world_group if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    # megatron-core and DeepSpeed call the collectives torch 2.13 renamed (all_gather_into_tensor, ...)
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    ps = _parallel_state()
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
    dims.tp_rank, dims.cp_rank = ps.get_tensor_model_parallel_rank(), ps.get_context_parallel_rank()
    dims.dp_rank = ps.get_data_parallel_rank()
    dims.tp_group = ps.get_tensor_model_parallel_group() if tp > 1 else None
    dims.cp_group = ps.get_context_parallel_group() if cp > 1 else None
    dims.grad_group = ps.get_data_parallel_group(with_context_parallel=True)
    expected = (dims.dp_rank * cp + dims.cp_rank) * tp + dims.tp_rank
    if expected != rank:
        raise RuntimeError(f"megatron-core laid out rank {rank} as dp {dims.dp_rank}, cp {dims.cp_rank}, tp "
                           f"{dims.tp_rank}; this trainer expects tp innermost, then cp, then dp")
    return dims


def _parallel_state():
    """megatron.core.parallel_state, imported without its notes about optional CUDA extensions."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
        try:
            from megatron.core import parallel_state
        except ImportError as err:
            raise ConfigError("a run of several processes lays out its ranks with megatron-core, which is not "
                              f"installed ({err}); pip install megatron-core") from None
    return parallel_state


def teardown(dims: ParallelDims, clean: bool = True) -> None:
    """Tear down megatron-core's layout and the process groups this object created. clean: every rank got here normally, so wait for the
    others first (a rank that closes its gloo connections while a peer still reads them aborts that peer);
    after an error the peers may never arrive, so no waiting."""
    if not (dims.distributed and dist.is_initialized()):
        return
    if clean:
        dims.barrier()
    _parallel_state().destroy_model_parallel()
    if dims.owns_group:
        dist.destroy_process_group()
        dims.owns_group = False
