"""CUDA-graph replay of a training micro-batch: forward, loss and backward as one launch.

A MoM-340M micro-batch issues a few thousand kernels; launched one by one from Python, the forward is bound
by the host whenever the GPU queue runs dry (after every optimizer step, every log, every sync). A CUDA graph
records the whole forward + backward once per input signature and replays it with one call.

What makes that possible, and what this module owns:
- static inputs: the packed batch (input_ids, labels [1, T]) and cu_seqlens padded to a power-of-two number
  of segments (trailing empty segments change nothing), so a stream of packed batches needs a handful of
  graphs, one per bucket, captured on first use;
- static gradients (`FlatGrads`): every parameter's .grad is a view into one fp32 buffer that lives outside
  the graphs, so the replayed backward accumulates into it like an eager one, micro-batch after micro-batch;
  clipping, the data-parallel all-reduce and zeroing act on that one buffer;
- the loss scales (CE normaliser, aux-loss weight) are device scalars written by fill_ before each replay.

The model's forward must not sync with the host or create tensors from host data (the fast MoM path and the
Triton kernels do neither; `model.mom_impl=reference` does). All graphs share one memory pool; they are
replayed one at a time on the current stream. With `capture=False` the same object runs the micro-batch
eagerly through the same static buffers, which is how CPU tests check the padding and the flat gradients.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

MIN_SEGMENT_BUCKET = 16


def segment_bucket(num_segments: int, minimum: int = MIN_SEGMENT_BUCKET) -> int:
    """The padded segment count for a batch of `num_segments` documents: the next power of two >= minimum."""
    return max(minimum, 1 << max(num_segments - 1, 0).bit_length())


def pad_cu_seqlens(cu_seqlens: torch.Tensor, num_segments: int) -> torch.Tensor:
    """cu_seqlens int32 [N+1] -> int32 [num_segments+1], the last offset repeated (empty trailing segments)."""
    n = cu_seqlens.numel() - 1
    if n > num_segments:
        raise ValueError(f"cannot pad {n} segments into {num_segments}")
    if n == num_segments:
        return cu_seqlens
    tail = cu_seqlens[-1:].expand(num_segments - n)
    return torch.cat([cu_seqlens, tail])


class FlatGrads:
    """The .grad of every parameter as a view into one buffer [total] (all parameters share one dtype).

    Autograd accumulates in place into an existing .grad, so an eager or replayed backward adds into the
    buffer. Never set these grads to None (`optimizer.zero_grad(set_to_none=True)` would detach them): call
    `zero_()`.
    """

    def __init__(self, params: list[nn.Parameter], pad_to: int = 1):
        """pad_to: the buffer's size is rounded up to a multiple of it (ZeRO shards it evenly); the padding
        belongs to no parameter and stays zero."""
        if not params:
            raise ValueError("FlatGrads needs at least one parameter")
        dtypes = {p.dtype for p in params}
        devices = {p.device for p in params}
        if len(dtypes) != 1 or len(devices) != 1:
            raise ValueError(f"FlatGrads needs parameters of one dtype and device, got {dtypes} on {devices}; "
                             "keep master weights fp32 on one device")
        self.params = params
        numel = -(-sum(p.numel() for p in params) // pad_to) * pad_to
        self.buffer = torch.zeros(numel, dtype=params[0].dtype, device=params[0].device)
        self.attach()

    def attach(self) -> None:
        """(Re)point every parameter's .grad at its slice of the buffer."""
        offset = 0
        for p in self.params:
            p.grad = self.buffer[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        self._addresses = [p.grad.data_ptr() for p in self.params]

    def attached(self) -> bool:
        """Whether every .grad is still its slice of the buffer (a host-side check, no device work)."""
        return all(p.grad is not None and p.grad.data_ptr() == address
                   for p, address in zip(self.params, self._addresses))

    def zero_(self) -> None:
        self.buffer.zero_()

    def clip_(self, max_norm: float) -> torch.Tensor:
        """Scale the gradients to norm <= max_norm (as torch's clip_grad_norm_); return the norm before
        clipping (fp32 device scalar, inf/NaN when a gradient is not finite). No host sync."""
        norm = torch.linalg.vector_norm(self.buffer, dtype=torch.float32)
        if max_norm < float("inf"):
            self.buffer.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0).to(self.buffer.dtype))
        return norm


@dataclass
class MicroBatchOutputs:
    """Detached device scalars of one micro-batch: summed CE, aux loss, router load [layers, E] or None."""
    loss_sum: torch.Tensor
    aux_loss: torch.Tensor
    router_load: torch.Tensor | None


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph | None
    input_ids: torch.Tensor
    labels: torch.Tensor
    cu_seqlens: torch.Tensor | None
    outputs: MicroBatchOutputs | None


class GraphedMicroBatch:
    """forward + backward of `model` on a packed micro-batch, replayed from a CUDA graph per input signature.

    model(input_ids, cu_seqlens=..., labels=...) must return an object with loss_sum, aux_loss and router_load.
    The backward is of `loss_sum * ce_scale + aux_loss * aux_scale`, accumulated into `grads`.
    autocast: returns a fresh autocast context (its weight cache must be off under capture, see
    `mom_train.precision.autocast_for_capture`). The returned outputs are overwritten by the next call: consume them first.
    """

    def __init__(self, model: nn.Module, grads: FlatGrads, autocast: Callable[[], contextlib.AbstractContextManager],
                 capture: bool = True, warmup: int = 2):
        self.model = model
        self.grads = grads
        self.autocast = autocast
        self.capture = capture
        self.warmup = warmup
        self.entries: dict[tuple, _Captured] = {}
        self.pool = None
        device = grads.buffer.device
        if capture and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; the parameters are on {device}")
        # [ce_scale, aux_scale], written in place before each call
        self.scales = torch.zeros(2, dtype=torch.float32, device=device)

    @property
    def num_graphs(self) -> int:
        return sum(e.graph is not None for e in self.entries.values())

    def __call__(self, input_ids: torch.Tensor, labels: torch.Tensor, cu_seqlens: torch.Tensor | None,
                 ce_scale: float, aux_scale: float) -> MicroBatchOutputs:
        """input_ids, labels long [1, T] with cu_seqlens int32 [N+1] (any N: padded here), or [B, T] with
        cu_seqlens None. Tensors may live on the host (pinned: copied asynchronously) or on the device."""
        num_segments = None
        if cu_seqlens is not None:
            num_segments = segment_bucket(cu_seqlens.numel() - 1)
            cu_seqlens = pad_cu_seqlens(cu_seqlens, num_segments)
        key = (tuple(input_ids.shape), num_segments)
        entry = self.entries.get(key)
        self.scales[0].fill_(ce_scale)
        self.scales[1].fill_(aux_scale)
        if entry is None:
            entry = self._build(input_ids, labels, cu_seqlens)
            self.entries[key] = entry
        else:
            for static, value in ((entry.input_ids, input_ids), (entry.labels, labels), (entry.cu_seqlens, cu_seqlens)):
                if static is not None:
                    static.copy_(value, non_blocking=True)
        if entry.graph is not None:
            entry.graph.replay()
        else:
            self._forward_backward(entry)
        return entry.outputs

    def _run(self, input_ids, labels, cu_seqlens) -> tuple[torch.Tensor, MicroBatchOutputs]:
        with self.autocast():
            out = self.model(input_ids, cu_seqlens=cu_seqlens, labels=labels)
        loss = out.loss_sum * self.scales[0] + out.aux_loss * self.scales[1]
        load = out.router_load.detach() if out.router_load is not None else None
        return loss, MicroBatchOutputs(out.loss_sum.detach(), out.aux_loss.detach(), load)

    def _forward_backward(self, entry: _Captured) -> None:
        """Eager path (capture=False): same buffers; outputs copied into the entry's static outputs."""
        loss, outputs = self._run(entry.input_ids, entry.labels, entry.cu_seqlens)
        loss.backward()
        if entry.outputs is None:
            entry.outputs = MicroBatchOutputs(*(t.clone() if t is not None else None for t in
                                                (outputs.loss_sum, outputs.aux_loss, outputs.router_load)))
            return
        for static, value in zip((entry.outputs.loss_sum, entry.outputs.aux_loss, entry.outputs.router_load),
                                 (outputs.loss_sum, outputs.aux_loss, outputs.router_load)):
            if static is not None:
                static.copy_(value)

    def _build(self, input_ids, labels, cu_seqlens) -> _Captured:
        device = self.scales.device
        statics = [t.to(device, copy=True) if t is not None else None for t in (input_ids, labels, cu_seqlens)]
        if not self.capture:
            return _Captured(None, *statics, None)
        params = [p for p in self.grads.params if p.requires_grad]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            # compiles and autotunes every kernel, initialises cuBLAS on this stream; leaves .grad alone
            # (kernels are compiled by the first capture; later buckets need one pass for new specialisations)
            for _ in range(self.warmup if self.pool is None else 1):
                loss, _ = self._run(*statics)
                torch.autograd.grad(loss, params, allow_unused=True)
                del loss
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                loss, outputs = self._run(*statics)
                loss.backward()
                del loss
        except RuntimeError as err:
            raise RuntimeError(
                f"capturing the training step as a CUDA graph failed: {err}\nThe forward and backward must not "
                "sync with the host (no .item(), .tolist(), or tensors built from host data); use "
                "model.mom_impl=fast, or set training.cuda_graphs=false") from err
        if self.pool is None:
            self.pool = graph.pool()
        return _Captured(graph, *statics, outputs)
