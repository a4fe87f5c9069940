"""Context parallelism for the trainer: each micro-batch's packed sequence split contiguously over the ranks of a
context-parallel group (`shard_batch`), every rank holding one part; the layers pass recurrent states and
conv halos between the ranks with the op-level functions of `mom_train.kernels.cp`, which the
`ContextParallel` object built here parameterises.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from mom_train.kernels.cp import ContextParallel
from mom_train.loss import shift_labels


@dataclass(frozen=True)
class LocalShard:
    """This rank's rows [start, end) of a packed sequence and their segments.

    cu_seqlens: int32 [n+1] local segment boundaries, 0 .. end - start (a document cut by the rank boundary
    appears as the first and/or last local segment, possibly empty). continues_in: the first local segment
    continues a document begun on an earlier rank; continues_out: the last one goes on past `end`.
    """
    start: int
    end: int
    cu_seqlens: torch.Tensor
    continues_in: bool
    continues_out: bool


def local_segments(cu: list[int], start: int, end: int) -> tuple[list[int], bool, bool]:
    """Rows [start, end) of a packed sequence with boundaries cu (0 .. L): (local boundaries 0 .. end - start,
    one segment per document that overlaps the rows, possibly empty at a cut; continues_in; continues_out)."""
    inner = [b - start for b in cu if start < b < end]
    return [0] + inner + [end - start], 0 < start and start not in cu, end < cu[-1] and end not in cu


def shard_packed_sequence(cu_seqlens: torch.Tensor | list[int], cp_size: int, cp_rank: int) -> LocalShard:
    """Split a packed sequence (global boundaries cu_seqlens [N+1], 0 .. L) into cp_size equal contiguous
    parts and return part cp_rank. Host-side (the data loader's boundaries), no device work."""
    cu = [int(x) for x in (cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else cu_seqlens)]
    if len(cu) < 2 or cu[0] != 0 or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"cu_seqlens must start at 0 and never decrease, got {cu[:8]}{'...' if len(cu) > 8 else ''}")
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank {cp_rank} is outside a context-parallel group of {cp_size} ranks")
    total = cu[-1]
    if total % cp_size:
        raise ValueError(f"{total} packed tokens do not split evenly over parallel.cp={cp_size} ranks; make "
                         f"training.micro_batch_size * training.seq_len a multiple of parallel.cp")
    part = total // cp_size
    start, end = cp_rank * part, (cp_rank + 1) * part
    local, continues_in, continues_out = local_segments(cu, start, end)
    return LocalShard(start, end, torch.tensor(local, dtype=torch.int32), continues_in, continues_out)


def shard_batch(input_ids: torch.Tensor, labels: torch.Tensor, cu_seqlens: torch.Tensor, group: dist.ProcessGroup,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, ContextParallel]:
    """This rank's part of a packed micro-batch: input_ids, labels long [1, L] (labels in the model's
    convention, shifted inside) and cu_seqlens int32 [N+1] -> (input_ids [1, L/cp], targets [1, L/cp]
    (already shifted: each row's next token, -100 at document ends), local cu_seqlens int32 on the input's
    device, ContextParallel). Pass them as `CausalLM.forward(input_ids, cu_seqlens, labels=targets,
    context=...)`. Reads the boundaries on the host (once per micro-batch, in the data path)."""
    shard = shard_packed_sequence(cu_seqlens.cpu(), dist.get_world_size(group), dist.get_rank(group))
    targets = shift_labels(labels, cu_seqlens)
    rows = slice(shard.start, shard.end)
    return (input_ids[:, rows], targets[:, rows], shard.cu_seqlens.to(input_ids.device),
            ContextParallel(group, shard.continues_out, single_document=shard.cu_seqlens.numel() == 2))
