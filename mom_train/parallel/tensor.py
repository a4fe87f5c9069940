"""Tensor parallelism (Megatron-style, on megatron-core's layers and mappings) with sequence parallelism.

Heads are split over the tp ranks of a group. Per block:
- mixer: every head-sized projection is column-parallel (q, g, and each memory's k/v/beta/a, split per head,
  never as one block of a stacked weight: a rank holds the k rows AND the v rows of its heads); A_log,
  dt_bias and the short-conv channels follow the local heads; o_proj is row-parallel. The router and o_norm
  are replicated.
- MLP: gate/up column-parallel, down row-parallel.
- The residual stream between blocks, the norms and the loss are sharded along the sequence with sequence
  parallelism (parallel.sequence_parallel, default on): each block entry all-gathers its input once
  (megatron's gather_from_sequence_parallel_region; backward reduce-scatter) and the row-parallel output is
  reduce-scattered back to sequence shards. Without it the stream is replicated: the entry is megatron's
  copy_to_tensor_model_parallel_region (backward all-reduce) and the row-parallel output is all-reduced.

Every token is counted once: the embedding, the LM head + cross entropy (the chunked fused kernel, logits
never whole) and the router's top-k run on this rank's token shard (rows tp_rank*L/tp ..), the top-k results
are all-gathered for the local heads, and the balance-loss counts are summed over the tp ranks. Parameters
used on a token shard (embedding/head, router, o_norm over local heads; with sequence parallelism also the
RMSNorms) are tagged `tp_partial`: their gradients are summed over tp (parallel/grad.py). Sharded parameters
carry a `TPShard` that says how the full tensor splits, which checkpoints use to gather and re-split them.

The column-parallel layers take an input that is already gathered (one all-gather per block for all of a
mixer's projections instead of one per projection), so they run with `disable_grad_reduce` and communicate
nothing themselves; the embedding's gather and the routing's gather are megatron's mappings too.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mom_train.loss import lm_head_loss
from mom_train.model.routing import Routing, TopKRouting, route
from mom_train.parallel.dims import ParallelDims


@dataclass(frozen=True)
class TPShard:
    """How a parameter's full tensor splits over tp ranks: along `dim`, which is made of `blocks` (sizes in
    the full tensor; None = one block), each cut into tp equal parts; rank r holds part r of every block, in
    block order. E.g. MoM's memory_kv_proj [S, k_dim + v_dim, D] is TPShard(1, (k_dim, v_dim))."""
    dim: int
    blocks: tuple[int, ...] | None = None

    def block_sizes(self, full_size: int) -> tuple[int, ...]:
        return self.blocks if self.blocks is not None else (full_size,)


def shard_tensor(full: torch.Tensor, spec: TPShard, rank: int, size: int) -> torch.Tensor:
    """Rank `rank`'s part of `full` under `spec` (a new contiguous tensor)."""
    parts = []
    for block in full.split(spec.block_sizes(full.shape[spec.dim]), spec.dim):
        if block.shape[spec.dim] % size:
            raise ValueError(f"a block of {block.shape[spec.dim]} rows does not split over {size} tensor-parallel "
                             "ranks; choose parallel.tp dividing the heads and the MLP width")
        parts.append(block.chunk(size, spec.dim)[rank])
    return torch.cat(parts, spec.dim).contiguous()


def unshard_tensor(parts: list[torch.Tensor], spec: TPShard, full_size: int) -> torch.Tensor:
    """Inverse of `shard_tensor`: every rank's part, in rank order -> the full tensor."""
    size = len(parts)
    local = [b // size for b in spec.block_sizes(full_size)]
    per_rank = [p.split(local, spec.dim) for p in parts]
    return torch.cat([torch.cat([r[i] for r in per_rank], spec.dim) for i in range(len(local))], spec.dim)


@dataclass(frozen=True)
class LayerPlan:
    """Tensor-parallel layout of one module: linear children split by output rows (column) or input columns
    (row), other parameters split per head (name -> TPShard), and replicated parameters whose gradient is
    partial over tp (used on local heads or a token shard)."""
    column: tuple[str, ...] = ()
    row: tuple[str, ...] = ()
    per_head: tuple[tuple[str, TPShard], ...] = ()
    partial: tuple[str, ...] = ()


_CONVS = (("q_conv1d.weight", TPShard(0)), ("k_conv1d.weight", TPShard(0)), ("v_conv1d.weight", TPShard(0)))
_DECAY = (("A_log", TPShard(0)), ("dt_bias", TPShard(0)))
MLP_PLAN = LayerPlan(column=("gate_proj", "up_proj"), row=("down_proj",))


def mixer_plan(mixer: nn.Module) -> LayerPlan:
    """The plan of a token mixer, by its type (MoMAttention, GatedDeltaNet, Attention)."""
    kind = type(mixer).__name__
    if kind == "MoMAttention":
        H = mixer.A_log.shape[0]
        convs = _CONVS if mixer.use_short_conv else ()
        return LayerPlan(column=("q_proj", "g_proj"), row=("o_proj",),
                         per_head=(("memory_kv_proj", TPShard(1, (mixer.key_dim, mixer.value_dim))),
                                   ("memory_ba_proj", TPShard(1, (H, H))), *_DECAY, *convs),
                         partial=("router.weight", "o_norm.weight"))
    if kind == "GatedDeltaNet":
        convs = _CONVS if mixer.use_short_conv else ()
        return LayerPlan(column=("q_proj", "k_proj", "v_proj", "b_proj", "a_proj", "g_proj"), row=("o_proj",),
                         per_head=(*_DECAY, *convs), partial=("o_norm.weight",))
    if kind == "Attention":
        return LayerPlan(column=("q_proj", "k_proj", "v_proj"), row=("o_proj",))
    raise ValueError(f"tensor parallelism has no plan for the token mixer {kind}")


# --------------------------------------------------------------------------------------- megatron-core


class _CpuCurrentDeviceTorch:
    """`torch`, except that `torch.cuda.current_device()` names the CPU (see `megatron_on_cpu`)."""

    class _Cuda:
        def __getattr__(self, name):
            return getattr(torch.cuda, name)

        @staticmethod
        def current_device() -> str:
            return "cpu"

    cuda = _Cuda()

    def __getattr__(self, name):
        return getattr(torch, name)


def megatron_on_cpu() -> bool:
    """megatron-core's sequence-parallel mappings allocate their all-gather and reduce-scatter outputs on
    `torch.cuda.current_device()`, which a CPU-only torch does not have. Where CUDA is absent, that one module
    (megatron.core.tensor_parallel.mappings) gets a view of torch whose current device is the CPU; torch itself
    is untouched. A no-op where CUDA exists. Returns whether the view is in place."""
    if torch.cuda.is_available():
        return False
    mappings = _megatron("tensor_parallel.mappings")
    if not isinstance(mappings.torch, _CpuCurrentDeviceTorch):
        mappings.torch = _CpuCurrentDeviceTorch()
    return True


def _megatron(module: str):
    """A megatron.core submodule, imported without its notes about optional CUDA extensions."""
    import importlib

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
        return importlib.import_module(f"megatron.core.{module}")


def _model_parallel_config(dims: ParallelDims, sequence_parallel: bool):
    """Weights allocated on the host, fp32 master weights, no initialisation (we copy in our own shard)."""
    core = _megatron("model_parallel_config")
    return core.ModelParallelConfig(tensor_model_parallel_size=dims.tp_size, sequence_parallel=sequence_parallel,
                                    use_cpu_initialization=True, perform_initialization=False,
                                    gradient_accumulation_fusion=False, params_dtype=torch.float32)


def _no_init(weight: torch.Tensor) -> None:
    """init_method for megatron's layers: the weights are copied from the full model afterwards."""


@functools.cache
def _layer_classes() -> tuple[type, type]:
    """(ColumnLinear, RowLinear): megatron-core's parallel linears with our call signature, defined on first
    use so that importing this module does not import megatron-core."""
    layers = _megatron("tensor_parallel.layers")

    class ColumnLinear(layers.ColumnParallelLinear):
        """Column-parallel linear whose input is already gathered for the block (see the module doc): it
        communicates nothing and returns only its output; x [..., in] -> [..., out / tp]."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out, _ = super().forward(x.reshape(-1, x.shape[-1]))
            return out.view(*x.shape[:-1], out.shape[-1])

    class RowLinear(layers.RowParallelLinear):
        """x [(1,) L, in / tp] -> [(1,) L / tp or L, out]: this rank's heads' share, summed over tp."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out, _ = super().forward(x.reshape(-1, x.shape[-1]))
            return out.view(*x.shape[:-2], -1, out.shape[-1])

    return ColumnLinear, RowLinear


def column_linear(linear: nn.Linear, dims: ParallelDims) -> nn.Module:
    """A ColumnParallelLinear holding this rank's output rows of `linear` (same values)."""
    column, _ = _layer_classes()
    layer = column(linear.in_features, linear.out_features, config=_model_parallel_config(dims, False),
                   init_method=_no_init, bias=False, gather_output=False, skip_bias_add=True,
                   disable_grad_reduce=True, tp_group=dims.tp_group)
    _copy_shard(layer.weight, linear.weight, TPShard(0), dims)
    return layer


def row_linear(linear: nn.Linear, dims: ParallelDims) -> nn.Module:
    """A RowParallelLinear holding this rank's input columns of `linear`: its output is reduce-scattered to
    sequence shards (sequence parallelism) or all-reduced."""
    _, row = _layer_classes()
    layer = row(linear.in_features, linear.out_features, config=_model_parallel_config(dims, dims.sequence_parallel),
                init_method=_no_init, bias=False, input_is_parallel=True, skip_bias_add=True, tp_group=dims.tp_group)
    _copy_shard(layer.weight, linear.weight, TPShard(1), dims)
    return layer


def _copy_shard(dest: nn.Parameter, full: torch.Tensor, spec: TPShard, dims: ParallelDims) -> None:
    with torch.no_grad():
        dest.copy_(shard_tensor(full.detach(), spec, dims.tp_rank, dims.tp_size))
    dest.tp_shard = spec


def _mappings():
    return _megatron("tensor_parallel.mappings")


def _rows(x: torch.Tensor, dims: ParallelDims, dim: int) -> torch.Tensor:
    """This rank's token shard of x along `dim` (a view; gradient zero elsewhere)."""
    size = x.shape[dim] // dims.tp_size
    return x.narrow(dim, dims.tp_rank * size, size)


def check_token_split(num_tokens: int, dims: ParallelDims) -> None:
    if num_tokens % dims.tp_size:
        raise ValueError(f"{num_tokens} tokens per rank do not split over parallel.tp={dims.tp_size} token shards; "
                         "make training.micro_batch_size * training.seq_len / parallel.cp a multiple of parallel.tp")


def _packed_rows(x: torch.Tensor) -> torch.Tensor:
    """[1, L, D] -> [L, D] (megatron's sequence mappings split and gather along dim 0)."""
    if x.dim() != 3 or x.shape[0] != 1:
        raise ValueError(f"tensor parallelism runs on packed input [1, L, D], got {tuple(x.shape)}; pack the batch "
                         "with cu_seqlens")
    return x[0]


def enter_block(x: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    """A block branch's input [1, L', D] -> every token [1, L, D] for the column-parallel layers."""
    m = _mappings()
    if dims.sequence_parallel:
        return m.gather_from_sequence_parallel_region(_packed_rows(x), group=dims.tp_group)[None]
    return m.copy_to_tensor_model_parallel_region(x, group=dims.tp_group)


def token_shard(x: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    """The replicated residual stream [1, L, D] -> this rank's token shard [1, L / tp, D]; backward all-gathers
    (without sequence parallelism: the loss runs on the shard)."""
    return _mappings().scatter_to_sequence_parallel_region(_packed_rows(x), group=dims.tp_group)[None]


def all_tokens(x: torch.Tensor, dims: ParallelDims, partial_grad: bool) -> torch.Tensor:
    """Token shards [L / tp, ...] -> [L, ...] on every rank. partial_grad: each rank's use of the result gives
    only part of its gradient (backward reduce-scatters); else the gradient is whole on every rank (backward
    takes this rank's rows)."""
    return _mappings().gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=partial_grad,
                                                            group=dims.tp_group)


class TokenShardedRouting(TopKRouting):
    """Top-k routing of this rank's token shard (rows tp_rank*L/tp ..): the balance-loss counts are summed over
    the tp ranks (and the context-parallel group), so each rank holds its share of the loss; the top-k
    indices and weights are all-gathered for the local heads (the weights' gradient is reduce-scattered)."""

    def __init__(self, topk: int, dims: ParallelDims):
        super().__init__(topk)
        self.dims = dims

    def forward(self, logits: torch.Tensor, context: object | None = None) -> Routing:
        check_token_split(logits.shape[0], self.dims)

        def token_totals(counts: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, int]:
            torch.distributed.all_reduce(counts, group=self.dims.tp_group)
            num_tokens *= self.dims.tp_size
            return context.token_totals(counts, num_tokens) if context is not None else (counts, num_tokens)

        shard = route(_rows(logits, self.dims, 0), self.topk, token_totals)
        return Routing(shard.probs, all_tokens(shard.topk_idx, self.dims, True),
                       all_tokens(shard.topk_weight, self.dims, True), shard.aux_loss, shard.load)


# ------------------------------------------------------------------------------------------ the model


def apply_tensor_parallel(model: nn.Module, dims: ParallelDims) -> None:
    """Shard a CausalLM (built identically on every rank) over dims.tp_group in place; see the module doc."""
    megatron_on_cpu()
    sp = dims.sequence_parallel
    for block in model.layers:
        _shard_layer(block.mixer, mixer_plan(block.mixer), dims)
        _shard_layer(block.mlp, MLP_PLAN, dims)
        for branch in (block.mixer, block.mlp):
            branch.register_forward_pre_hook(lambda module, args: (enter_block(args[0], dims), *args[1:]))
        if hasattr(block.mixer, "routing"):
            block.mixer.routing = TokenShardedRouting(block.mixer.routing.topk, dims)
        if sp:
            _tag_partial(block.attn_norm.weight, block.mlp_norm.weight)
    if sp:
        _tag_partial(model.norm.weight)
    _tag_partial(model.head_weight, model.embed.weight)
    model.embed.register_forward_pre_hook(lambda module, args: (_embedding_rows(args[0], dims),))
    if not sp:
        # the stream is replicated: every rank gets all rows; each rank's embedding gradient is its own rows'
        model.embed.register_forward_hook(lambda module, args, out: all_tokens(_packed_rows(out), dims, False)[None])
    model.loss_fn = _TokenShardLoss(dims)
    model.logits_fn = _AllTokenLogits(dims)


def _embedding_rows(input_ids: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    """input_ids [1, L] -> this rank's token shard [1, L / tp] (the embedding runs on it)."""
    check_token_split(input_ids.shape[1], dims)
    if input_ids.shape[0] != 1:
        raise ValueError(f"tensor parallelism runs on packed input [1, L], got {tuple(input_ids.shape)}; pack the "
                         "batch with cu_seqlens")
    return _rows(input_ids, dims, 1)


def _shard_layer(module: nn.Module, plan: LayerPlan, dims: ParallelDims) -> None:
    for name in plan.column:
        setattr(module, name, column_linear(getattr(module, name), dims))
    for name in plan.row:
        setattr(module, name, row_linear(getattr(module, name), dims))
    for name, spec in plan.per_head:
        owner_name, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        full = getattr(owner, attr)
        local = nn.Parameter(shard_tensor(full.detach(), spec, dims.tp_rank, dims.tp_size))
        local.__dict__.update({k: v for k, v in full.__dict__.items() if not k.startswith("tp_")})
        local.tp_shard = spec
        setattr(owner, attr, local)
    _tag_partial(*(module.get_parameter(name) for name in plan.partial))


def _tag_partial(*params: nn.Parameter) -> None:
    for p in params:
        p.tp_partial = True


class _TokenShardLoss:
    """CausalLM.loss_fn under tensor parallelism: head + cross entropy of this rank's token shard."""

    def __init__(self, dims: ParallelDims):
        self.dims = dims

    def __call__(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                 fused: bool) -> tuple[torch.Tensor, None]:
        check_token_split(targets.shape[1], self.dims)
        if not self.dims.sequence_parallel:
            hidden = token_shard(hidden, self.dims)
        loss_sum, _ = lm_head_loss(hidden, weight, _rows(targets, self.dims, 1), fused)
        return loss_sum, None


class _AllTokenLogits:
    """CausalLM.logits_fn under tensor parallelism: logits of every token (evaluation; no gradient)."""

    def __init__(self, dims: ParallelDims):
        self.dims = dims

    def __call__(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.dims.sequence_parallel:
            hidden = all_tokens(_packed_rows(hidden), self.dims, False)[None]
        return F.linear(hidden, weight)


def local_parameter_count(model: nn.Module, tp: int) -> int:
    """Parameters one tp rank holds of an unsharded model: per-head and column/row parameters / tp, the rest
    whole (tied embedding counted once)."""
    sharded = set()
    for block in model.layers:
        for module, plan in ((block.mixer, mixer_plan(block.mixer)), (block.mlp, MLP_PLAN)):
            sharded |= {id(getattr(module, n).weight) for n in (*plan.column, *plan.row)}
            sharded |= {id(module.get_parameter(n)) for n, _ in plan.per_head}
    unique = {id(p): p for p in model.parameters()}
    return sum(p.numel() // tp if key in sharded else p.numel() for key, p in unique.items())
