"""ZeRO stages 1 and 2 in our step engine: each of the N dp x cp ranks of a tp rank (`ParallelDims.grad_group`)
keeps the AdamW moments of, and updates, one contiguous 1/N of the parameters.

Layout. Every trainable parameter is a view into one flat fp32 buffer, and its gradient a view into a second
one of the same layout (`FlatGrads`, which CUDA-graph replay also needs): parameters in the order
[tp-sharded | tp-partial | replicated], each run decayed-then-not, padded to a multiple of N. Rank r owns
elements [r S, (r + 1) S) with S = padded size / N; that range cuts the layout into at most six pieces
(run x decay group), the tensors its fused AdamW updates (two param groups: decayed and not).

One optimizer step, after the step's last backward:
  tp-partial gradients summed over tp (one all-reduce of their slice)
  -> stage 1: all-reduce of the whole gradient (every rank keeps it whole);
     stage 2: reduce-scatter, each rank receiving the sum of only its shard (half the traffic)
  -> global norm (squares of each rank's shard summed over the group, sharded parameters over tp) and
     clipping of the shard -> fused AdamW on the shard (skipped on the device when not finite)
  -> all-gather of the updated shards into every rank's parameter buffer.
The collectives run outside any captured CUDA graph, between replays. Both stages keep the whole fp32
gradient buffer (the backward accumulates into it over micro-batches; graphs need it static): stage 2
saves communication, not gradient memory; DeepSpeed (parallel.engine=deepspeed) shards gradient memory too.

Checkpoints stay in the one-process format: the shards of the moments are gathered on the first rank into
one AdamW state per parameter (`full_state_dict`), and `load_full_state_dict` takes this rank's shard of it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from mom_train.cuda_graph import FlatGrads
from mom_train.parallel.dims import ParallelDims
from mom_train.parallel.grad import clip_coefficient, is_partial, is_sharded

# torch >= 2.13 names them *_single (the *_tensor names warn); older releases have only *_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass(frozen=True)
class Piece:
    """Elements [start, stop) of the flat layout owned by this rank, in one run and decay group."""
    start: int
    stop: int
    sharded: bool
    decay: bool


class ZeroAdamW:
    """Fused AdamW over this rank's shard of the flat parameters; see the module doc.

    params: the trainable parameters in flat-buffer order (FlatGrads.params); decayed: the set of ids of the
    parameters in the weight-decay group; grads: the flat gradient buffer whose layout `params` gives.
    """

    def __init__(self, grads: FlatGrads, decayed: set[int], dims: ParallelDims, stage: int, lr: float,
                 betas: tuple[float, float], eps: float, weight_decay: float):
        if stage not in (1, 2):
            raise ValueError(f"ZeroAdamW runs ZeRO stages 1 and 2, got {stage}")
        self.grads, self.dims, self.stage = grads, dims, stage
        self.params = grads.params
        self.decayed = decayed
        num = dims.grad_size
        self.shard_size = grads.buffer.numel() // num
        if self.shard_size * num != grads.buffer.numel():
            raise ValueError(f"the flat gradient buffer ({grads.buffer.numel()}) must be padded to a multiple of {num}")
        # the parameters become views of one flat buffer (same layout as the gradients)
        self.flat = torch.zeros_like(grads.buffer)
        offset = 0
        for p in self.params:
            self.flat[offset:offset + p.numel()].copy_(p.data.view(-1))
            p.data = self.flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        start = dims.grad_rank * self.shard_size
        self.shard = slice(start, start + self.shard_size)
        self.pieces = self._pieces(decayed)
        self.shard_grad = torch.zeros(self.shard_size, dtype=grads.buffer.dtype, device=grads.buffer.device)
        # leaf views of the flat parameters, their gradients views of this rank's reduced gradient
        self.tensors = [self.flat[p.start:p.stop] for p in self.pieces]
        for piece, t in zip(self.pieces, self.tensors):
            t.grad = self._grad_view(piece)
        # the groups of a one-process optimizer: decayed parameters, then the others (either may be empty here)
        groups = [{"params": [t for piece, t in zip(self.pieces, self.tensors) if piece.decay == decay],
                   "weight_decay": weight_decay if decay else 0.0} for decay in (True, False)]
        self.optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
        self.sharded_slice = slice(0, sum(p.numel() for p in self.params if is_sharded(p)))
        partial_start = self.sharded_slice.stop
        self.partial_slice = slice(partial_start, partial_start + sum(p.numel() for p in self.params if is_partial(p)))

    def _pieces(self, decayed: set[int]) -> list[Piece]:
        """This rank's shard cut at every change of run (sharded / partial / replicated) or decay group."""
        pieces, offset = [], 0
        for p in self.params:
            lo, hi = max(offset, self.shard.start), min(offset + p.numel(), self.shard.stop)
            offset += p.numel()
            if lo >= hi:
                continue
            key = (is_sharded(p), id(p) in decayed)
            if pieces and pieces[-1].stop == lo and (pieces[-1].sharded, pieces[-1].decay) == key:
                pieces[-1] = Piece(pieces[-1].start, hi, *key)
            else:
                pieces.append(Piece(lo, hi, *key))
        return pieces

    def _grad_view(self, piece: Piece) -> torch.Tensor:
        if self.stage == 2:
            return self.shard_grad[piece.start - self.shard.start:piece.stop - self.shard.start]
        return self.grads.buffer[piece.start:piece.stop]

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def reduce_and_clip(self, max_norm: float) -> torch.Tensor:
        """Sum the tp-partial gradients over tp, average over the dp x cp group (all-reduce or reduce-scatter),
        clip this rank's shard to global norm <= max_norm; return the norm before clipping (device scalar)."""
        if not self.grads.attached():
            raise RuntimeError("a parameter's .grad was replaced or set to None; under ZeRO the gradients must "
                               "stay in the engine's flat buffer (zero them, do not reassign)")
        buffer, dims = self.grads.buffer, self.dims
        if dims.tp_size > 1 and self.partial_slice.stop > self.partial_slice.start:
            dims.all_reduce_(buffer[self.partial_slice], dims.tp_group)
        if self.stage == 1:
            dims.all_reduce_(buffer, dims.grad_group)
            buffer.div_(dims.grad_size)
        else:
            _reduce_scatter(self.shard_grad, buffer, group=dims.grad_group)
            self.shard_grad.div_(dims.grad_size)
        grads = [t.grad for t in self.tensors]
        squares = torch.zeros(2, dtype=torch.float32, device=buffer.device)
        for piece, g in zip(self.pieces, grads):
            squares[0 if piece.sharded else 1] += g.float().pow(2).sum()
        dist.all_reduce(squares, group=dims.grad_group)
        if dims.tp_size > 1:
            dist.all_reduce(squares[:1], group=dims.tp_group)
        norm = squares.sum().sqrt()
        if max_norm < math.inf and grads:
            torch._foreach_mul_(grads, clip_coefficient(norm, max_norm).to(grads[0].dtype))
        return norm

    def step(self, found_inf: torch.Tensor) -> None:
        """AdamW on the shard (untouched where found_inf), then every rank's parameters from all shards."""
        self.optimizer.found_inf = found_inf
        self.optimizer.step()
        mine = self.flat[self.shard].clone()
        _all_gather(self.flat, mine, group=self.dims.grad_group)

    def zero_grad(self) -> None:
        self.grads.zero_()
        self.shard_grad.zero_()

    # ------------------------------------------------------------------------------------ checkpoints

    def _shard_moments(self, key: str) -> torch.Tensor:
        """This rank's shard [S] of one AdamW moment (zeros at padding and before the first step)."""
        out = torch.zeros(self.shard_size, dtype=torch.float32, device=self.flat.device)
        for piece, t in zip(self.pieces, self.tensors):
            state = self.optimizer.state.get(t)
            if state and key in state:
                out[piece.start - self.shard.start:piece.stop - self.shard.start] = state[key]
        return out

    def full_state_dict(self, param_index: dict[int, int]) -> dict | None:
        """The AdamW state dict one process would have (param_index: id(param) -> its index in the optimizer
        order) on the group's first rank, None on the others (collective over the dp x cp group)."""
        root = dist.get_global_rank(self.dims.grad_group, 0)
        moments = {}
        for key in ("exp_avg", "exp_avg_sq"):
            local = self._shard_moments(key)
            parts = [torch.empty_like(local) for _ in range(self.dims.grad_size)] if self.dims.grad_rank == 0 else None
            dist.gather(local, parts, dst=root, group=self.dims.grad_group)
            moments[key] = torch.cat(parts).cpu() if parts is not None else None
        steps = [s["step"] for s in self.optimizer.state.values() if "step" in s]
        step = steps[0].detach().cpu().clone() if steps else None
        if self.dims.grad_rank != 0:
            return None
        state, offset = {}, 0
        for p in self.params:
            n = p.numel()
            if step is not None:
                state[param_index[id(p)]] = {"step": step.clone(),
                                             **{k: v[offset:offset + n].view_as(p).clone() for k, v in moments.items()}}
            offset += n
        groups = []
        for decay, group in zip((True, False), self.param_groups):
            ids = sorted(param_index[id(p)] for p in self.params if (id(p) in self.decayed) == decay)
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
        return {"state": state, "param_groups": groups}

    def load_full_state_dict(self, full: dict, param_index: dict[int, int]) -> None:
        """Take this rank's shard of a one-process AdamW state dict (as `full_state_dict` writes it)."""
        moments = {key: torch.zeros_like(self.flat) for key in ("exp_avg", "exp_avg_sq")}
        step = None
        offset = 0
        for p in self.params:
            entry = full["state"].get(param_index[id(p)])
            if entry is not None:
                for key in moments:
                    moments[key][offset:offset + p.numel()] = entry[key].reshape(-1).to(self.flat.device)
                step = entry["step"]
            offset += p.numel()
        if step is None:
            return
        for piece, t in zip(self.pieces, self.tensors):
            self.optimizer.state[t] = {
                "step": torch.as_tensor(step, dtype=torch.float32).clone().to(self.flat.device),
                **{k: v[piece.start:piece.stop].clone() for k, v in moments.items()}}
        for group, saved in zip(self.optimizer.param_groups, full["param_groups"]):
            group["lr"] = saved.get("lr", group["lr"])


def zero_flat_size(params: list[nn.Parameter], num_ranks: int) -> int:
    """The flat buffers' size: every parameter's elements, padded to a multiple of num_ranks."""
    total = sum(p.numel() for p in params)
    return -(-total // num_ranks) * num_ranks
