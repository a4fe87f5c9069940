"""Mixture-of-Memories token mixer (MOM_SPEC.md): a router sends each token to top-k of E gated-delta-rule
memories (plus one shared memory that sees every token); each memory runs over its own tokens only.

Parameter layout. Every stream's projections live in two stacked weights (S = E, +1 with the shared memory,
which is the last stream): memory_kv_proj [S, H*dk + H*dv, D] (rows k | v) and memory_ba_proj [S, 2H, D]
(rows b | a), so the fast path needs one GEMM per stack for all streams (3-D weights, decayed like linears).
Shared by all streams: q_proj, A_log [H], dt_bias [H], the short convs, g_proj, o_norm, o_proj. router [E, D]
has no bias.

Two implementations (cfg.mom_impl) compute the same function:
- "fast": no host syncs. A memory-major buffer of T*k (+T) rows (kernels/routing: build_stream_plan, Triton on CUDA)
  holds the routed slots and shared rows. k/v of its rows come from one dense GEMM over every (token, stream)
  followed by a row gather (cfg.mom_projection = "dense"), or from a grouped GEMM over each stream's
  contiguous rows ("grouped", the default for bf16 on Hopper); b/a (2H columns per stream) always take the
  dense route. q is projected once per token and gathered. In training on the Triton path one function runs the
  three short convs and the gated delta rule over the buffer with its cu_seqlens (S*N segments, S streams,
  N documents), keeping only the conv inputs; outputs are mixed back per token with the router weights
  (kernels/routing). Gathered rows are rebuilt in backward rather than kept (model/recompute.py).
- "reference": the readable definition, a Python loop over streams and documents with boolean masks.

Decode state (cache.RecurrentState): recurrent [N, S, H, dk, dv] fp32, conv (q, k, v) each [N, S, C, W-1],
S = E (+1 shared, last). A stream that receives no token of a call keeps its state exactly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mom_train.config import ModelConfig
from mom_train.kernels import gated_delta_rule
from mom_train.model.cache import RecurrentState
from mom_train.model.conv import ShortConvolution, conv_fuses_with_delta_rule
from mom_train.model.gated_deltanet import LINEAR_INIT_GAIN, init_decay_params
from mom_train.model.linear import make_linear
from mom_train.model.norm import GatedRMSNorm, gated_norm_linear
from mom_train.model.recompute import recompute_in_backward
from mom_train.kernels.routing import build_stream_plan_auto, combine_rows, gather_tokens, select_rows
from mom_train.kernels.cp import (
    ContextParallel, check_context_inputs, context_conv_states, context_parallel_gated_delta_rule, stream_chains)
from mom_train.model.routing import Routing, TopKRouting


class MoMAttention(nn.Module):
    """x [B, T, D] (or packed [1, T, D] with cu_seqlens) -> (y [B, T, D], RecurrentState | None, aux) with
    aux = {"aux_loss": fp32 scalar, "router_load": [E] fraction of slots per memory}."""

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        if cfg.topk > cfg.num_memories:
            raise ValueError(f"MoMAttention: topk={cfg.topk} exceeds num_memories={cfg.num_memories}; "
                             "choose topk <= num_memories")
        D, H, E = cfg.hidden_size, cfg.num_heads, cfg.num_memories
        self.layer_idx = layer_idx
        self.num_memories = E
        self.topk = cfg.topk
        self.shared_memory = cfg.shared_memory
        self.impl = cfg.mom_impl
        self.kernel_backend = cfg.kernel_backend
        self.head_k_dim = cfg.head_dim
        self.head_v_dim = int(cfg.head_dim * cfg.expand_v)
        key_dim, value_dim = H * self.head_k_dim, H * self.head_v_dim
        self.projection = cfg.mom_projection
        self.router = make_linear(D, E, kind="replicated")
        self.routing = TopKRouting(cfg.topk)
        self.q_proj = make_linear(D, key_dim, kind="column")
        # per stream: k [key_dim] | v [value_dim] rows, and b [H] | a [H] rows
        num_streams = E + int(cfg.shared_memory)
        self.memory_kv_proj = nn.Parameter(torch.empty(num_streams, key_dim + value_dim, D))
        self.memory_ba_proj = nn.Parameter(torch.empty(num_streams, 2 * H, D))
        self.A_log = nn.Parameter(torch.empty(H))
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.use_short_conv = cfg.use_short_conv
        if cfg.use_short_conv:
            self.q_conv1d = ShortConvolution(key_dim, cfg.conv_size, activation="silu", backend=cfg.kernel_backend)
            self.k_conv1d = ShortConvolution(key_dim, cfg.conv_size, activation="silu", backend=cfg.kernel_backend)
            self.v_conv1d = ShortConvolution(value_dim, cfg.conv_size, activation="silu", backend=cfg.kernel_backend)
        self.g_proj = make_linear(D, value_dim, kind="column")
        self.o_norm = GatedRMSNorm(self.head_v_dim, eps=cfg.norm_eps, backend=cfg.kernel_backend)
        self.o_proj = make_linear(value_dim, D, kind="row")
        self.reset_parameters()

    @property
    def num_streams(self) -> int:
        return self.num_memories + int(self.shared_memory)

    # widths from parameter shapes: a tensor-parallel rank holds num_heads / tp heads and nothing else changes
    @property
    def key_dim(self) -> int:
        return self.A_log.shape[0] * self.head_k_dim

    @property
    def value_dim(self) -> int:
        return self.A_log.shape[0] * self.head_v_dim

    def reset_parameters(self) -> None:
        for linear in (self.router, self.q_proj, self.g_proj, self.o_proj):
            nn.init.xavier_uniform_(linear.weight, gain=LINEAR_INIT_GAIN)
        with torch.no_grad():
            # each stream's k, v, b, a block like its own linear (xavier fan-out is the block's rows)
            for stream in range(self.num_streams):
                for weight in self._stream_weights(stream):
                    nn.init.xavier_uniform_(weight, gain=LINEAR_INIT_GAIN)
        init_decay_params(self.A_log, self.dt_bias)
        if self.use_short_conv:
            for conv in (self.q_conv1d, self.k_conv1d, self.v_conv1d):
                conv.reset_parameters()
        self.o_norm.reset_parameters()

    def forward(
        self,
        x: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
        cache: RecurrentState | None = None,
        use_cache: bool = False,
        context: ContextParallel | None = None,
    ) -> tuple[torch.Tensor, RecurrentState | None, dict]:
        """x [B, T, D]; cu_seqlens int32 [N+1] for packed input (B == 1); cache: this layer's state from an
        earlier call (N = B, or len(cu_seqlens) - 1 sequences); use_cache: return the updated state.
        context: x holds this rank's rows of a packed sequence split over a context-parallel group; every
        memory's (and the shared memory's) state and conv halo cross the ranks (fast path only)."""
        check_context_inputs("MoMAttention", context, x, cu_seqlens, cache, use_cache)
        if context is not None and self.impl != "fast":
            raise ValueError("MoMAttention: context parallelism runs on the fast path; set model.mom_impl=fast")
        B, T, D = x.shape
        if cu_seqlens is not None and B != 1:
            raise ValueError(f"MoMAttention: with cu_seqlens the input must be packed as [1, T, D], got B={B}")
        if cu_seqlens is None:
            # a padded batch is B documents of length T laid end to end
            cu_seqlens = torch.arange(B + 1, device=x.device, dtype=torch.int32) * T
        x = x.reshape(B * T, D)
        if cache is not None:
            self._check_cache(cache, cu_seqlens.numel() - 1)
        routing = self.routing(self.router(x), context)
        if self.impl == "fast":
            o, new_cache = self._mix_fast(x, routing, cu_seqlens, cache, use_cache, context)  # [L, H, dv]
        else:
            o, new_cache = self._mix_reference(x, routing, cu_seqlens, cache, use_cache)
        y = gated_norm_linear(self.o_norm, self.o_proj, o, self.g_proj(x).unflatten(-1, (-1, self.head_v_dim)))
        # [B, T', D]: under sequence parallelism o_proj returns this rank's sequence shard
        y = y.view(B, -1, y.shape[-1])
        return y, new_cache, {"aux_loss": routing.aux_loss, "router_load": routing.load}

    def _stream_weights(self, stream: int) -> tuple[torch.Tensor, ...]:
        """(W_k, W_v, W_b, W_a) of one stream; stream E is the shared memory."""
        H = self.A_log.shape[0]
        return (*self.memory_kv_proj[stream].split([self.key_dim, self.value_dim], 0),
                *self.memory_ba_proj[stream].split([H, H], 0))

    def _decay_and_beta(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log decay g (fp32) and write strength beta from the raw a/b projections [..., H]."""
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias.float())
        return g, b.sigmoid()

    def _short_conv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None,
                    states: tuple[torch.Tensor | None, ...], use_cache: bool) -> tuple[tuple, tuple]:
        """Short conv (or SiLU without it) of q, k, v [1, R, C] per segment -> ((q, k, v), conv states)."""
        if not self.use_short_conv:
            return (F.silu(q), F.silu(k), F.silu(v)), ()
        q, state_q = self.q_conv1d(q, cu_seqlens, states[0], use_cache)
        k, state_k = self.k_conv1d(k, cu_seqlens, states[1], use_cache)
        v, state_v = self.v_conv1d(v, cu_seqlens, states[2], use_cache)
        return (q, k, v), (state_q, state_k, state_v)

    def _mix_fast(self, x: torch.Tensor, routing: Routing, cu_seqlens: torch.Tensor,
                  cache: RecurrentState | None, use_cache: bool,
                  context: ContextParallel | None = None) -> tuple[torch.Tensor, RecurrentState | None]:
        """Memory outputs mixed per token, o [L, H, dv], from x [L, D], sync-free (see module docstring)."""
        L = x.shape[0]
        S = self.num_streams
        backend = "torch" if self.kernel_backend == "torch" else "auto"
        plan = build_stream_plan_auto(routing.topk_idx, cu_seqlens, self.num_memories, self.shared_memory, backend)
        row_token = torch.div(plan.src, S, rounding_mode="floor")  # [R]

        def to_rows(t: torch.Tensor) -> torch.Tensor:
            """Per-token rows [L, F] -> one copy per buffer row [R, F]."""
            return gather_tokens(t, row_token, plan.dest, self.shared_memory, backend)

        if self._projection(x) == "grouped":
            # each stream's rows are contiguous in the buffer: grouped GEMMs, stream s ending at offs[s]; the
            # gathered input is rebuilt from x in backward instead of kept
            num_docs = (plan.cu_seqlens.numel() - 1) // S
            # contiguous: the CUDA grouped GEMM reads offs as a dense array (a strided view gave wrong groups)
            offs = plan.cu_seqlens[num_docs::num_docs].contiguous()  # [S] int32
            x_rows = to_rows(x)
            with recompute_in_backward(x_rows, lambda: to_rows(x)):
                kv = grouped_linear(x_rows, self.memory_kv_proj, offs)  # [R, key_dim + value_dim]
        else:
            # k/v of every (token, stream) in one GEMM, then the buffer's rows
            kv = select_rows(F.linear(x, self.memory_kv_proj.flatten(0, 1)).view(L * S, -1), plan.src, backend)
        # b/a are 2H columns per stream: one small dense GEMM over every (token, stream), then the rows
        ba = select_rows(F.linear(x, self.memory_ba_proj.flatten(0, 1)).view(L * S, -1), plan.src, backend)
        b, a = ba.chunk(2, -1)
        g, beta = self._decay_and_beta(a, b)
        # q once per token, then one copy per buffer row
        q_tokens = self.q_proj(x)
        q = to_rows(q_tokens)
        if context is None and self._conv_fused_training(x, cache, use_cache):
            # training: conv outputs and the gathered q are rebuilt in backward instead of kept
            from mom_train.kernels.gated_delta_rule.conv_chunk import conv_chunk_gated_delta_rule

            with recompute_in_backward(q, lambda: to_rows(q_tokens)):
                o = conv_chunk_gated_delta_rule(q, None, None, self._conv_weights(), g, beta, plan.cu_seqlens,
                                                self.head_k_dim, kv_in=kv)
            return self._unpermute(o, routing, plan, L), None
        k, v = kv.split([self.key_dim, self.value_dim], -1)
        conv_states = (None,) * 3
        if cache is not None and self.use_short_conv:
            conv_states = tuple(map(_to_segments, cache.conv))
        if context is not None:
            return self._mix_context(q[None], k[None], v[None], g, beta, plan, routing, L, context), None
        (q, k, v), new_conv = self._short_conv(q[None], k[None], v[None], plan.cu_seqlens, conv_states, use_cache)
        o, state = gated_delta_rule(
            q.unflatten(-1, (-1, self.head_k_dim)),
            k.unflatten(-1, (-1, self.head_k_dim)),
            v.unflatten(-1, (-1, self.head_v_dim)),
            g[None], beta[None],
            initial_state=_to_segments(cache.recurrent) if cache is not None else None,
            output_final_state=use_cache,
            cu_seqlens=plan.cu_seqlens,
            use_qk_l2norm_in_kernel=True,
            backend=self.kernel_backend,
        )
        new_cache = None
        if use_cache:
            new_cache = RecurrentState(_from_segments(state, S), tuple(_from_segments(c, S) for c in new_conv))
        return self._unpermute(o[0], routing, plan, L), new_cache

    def _mix_context(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                     plan, routing: Routing, L: int, context: ContextParallel) -> torch.Tensor:
        """`_mix_fast`'s conv and delta rule over this rank's buffer [1, R, C] when the sequence is split over
        a context-parallel group: each stream is a chain whose conv halo and state come from earlier ranks."""
        first, last = stream_chains(plan.cu_seqlens, self.num_streams)
        conv_states = (None,) * 3
        if self.use_short_conv:
            conv_states = context_conv_states((q, k, v), plan.cu_seqlens, first, last, context,
                                              self.q_conv1d.kernel_size)
        (q, k, v), _ = self._short_conv(q, k, v, plan.cu_seqlens, conv_states, False)
        o = context_parallel_gated_delta_rule(
            q.unflatten(-1, (-1, self.head_k_dim)), k.unflatten(-1, (-1, self.head_k_dim)),
            v.unflatten(-1, (-1, self.head_v_dim)), g[None], beta[None], plan.cu_seqlens, first, last,
            context.continues_out, context.group, use_qk_l2norm_in_kernel=True, backend=self.kernel_backend,
            passes_through=context.single_document)
        return self._unpermute(o[0], routing, plan, L)

    def _unpermute(self, o: torch.Tensor, routing: Routing, plan, L: int) -> torch.Tensor:
        """Buffer outputs o [R, H, dv] -> per-token mix [L, H, dv]: the router-weighted sum of each token's k
        routed rows, plus its shared row (the last L rows)."""
        backend = "torch" if self.kernel_backend == "torch" else "auto"
        mixed = combine_rows(o.flatten(1), plan.dest, routing.topk_weight, self.shared_memory, backend)
        return mixed.view(L, *o.shape[1:])

    def _projection(self, x: torch.Tensor) -> str:
        """The k/v GEMM route: cfg.mom_projection, with auto = grouped for bf16 GEMMs (autocast or bf16 input)
        on Hopper or newer GPUs, where torch's grouped GEMM kernel runs; dense otherwise."""
        if self.projection != "auto":
            return self.projection
        if not x.is_cuda or torch.cuda.get_device_capability(x.device)[0] < 9:
            return "dense"
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
        return "grouped" if dtype == torch.bfloat16 else "dense"

    def _conv_fused_training(self, x: torch.Tensor, cache: RecurrentState | None, use_cache: bool) -> bool:
        """Training on the Triton path: short convs and delta rule run as one function keeping only conv inputs."""
        return self.use_short_conv and conv_fuses_with_delta_rule(
            (self.q_conv1d, self.k_conv1d, self.v_conv1d), x, self.kernel_backend, cache is not None, use_cache)

    def _conv_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.q_conv1d.weight, self.k_conv1d.weight, self.v_conv1d.weight

    def _mix_reference(self, x: torch.Tensor, routing: Routing, cu_seqlens: torch.Tensor,
                       cache: RecurrentState | None, use_cache: bool) -> tuple[torch.Tensor, RecurrentState | None]:
        """Same as `_mix_fast`, written as a loop over streams and documents with boolean masks."""
        L = x.shape[0]
        H = self.A_log.shape[0]
        bounds = cu_seqlens.tolist()
        q_all = self.q_proj(x)
        mixed = x.new_zeros(L, H, self.head_v_dim, dtype=torch.float32)
        states, conv_states = [], []
        for n in range(len(bounds) - 1):
            start, end = bounds[n], bounds[n + 1]
            doc_states, doc_conv = [], []
            for stream in range(self.num_streams):
                if stream < self.num_memories:
                    chosen = routing.topk_idx[start:end] == stream  # [len, k]
                    mask = chosen.any(-1)
                    weight = (routing.topk_weight[start:end] * chosen).sum(-1)[mask]
                else:
                    mask = torch.ones(end - start, dtype=torch.bool, device=x.device)
                    weight = torch.ones(end - start, device=x.device)
                pos = start + mask.nonzero()[:, 0]
                state = cache.recurrent[n, stream][None] if cache is not None else None
                conv = tuple(c[n, stream][None] for c in cache.conv) if cache is not None else (None,) * 3
                if pos.numel() == 0:
                    # a stream without tokens keeps its state
                    doc_states.append(state)
                    doc_conv.append(conv)
                    continue
                W_k, W_v, W_b, W_a = self._stream_weights(stream)
                xs = x[pos]
                (q, k, v), conv = self._short_conv(q_all[pos][None], F.linear(xs, W_k)[None],
                                                   F.linear(xs, W_v)[None], None, conv, use_cache)
                g, beta = self._decay_and_beta(F.linear(xs, W_a), F.linear(xs, W_b))
                o, state = gated_delta_rule(
                    q.unflatten(-1, (-1, self.head_k_dim)),
                    k.unflatten(-1, (-1, self.head_k_dim)),
                    v.unflatten(-1, (-1, self.head_v_dim)),
                    g[None], beta[None],
                    initial_state=state,
                    output_final_state=use_cache,
                    use_qk_l2norm_in_kernel=True,
                    backend=self.kernel_backend,
                )
                mixed = mixed.index_add(0, pos, o[0].float() * weight[:, None, None])
                doc_states.append(state)
                doc_conv.append(conv)
            states.append(doc_states)
            conv_states.append(doc_conv)
        new_cache = None
        if use_cache:
            new_cache = self._stack_reference_states(states, conv_states, x, len(bounds) - 1)
        return mixed.to(x.dtype), new_cache

    def _stack_reference_states(self, states: list, conv_states: list, x: torch.Tensor,
                                num_docs: int) -> RecurrentState:
        """Per (document, stream) states (None = never initialised, i.e. zeros) -> RecurrentState."""
        H, K, V = self.A_log.shape[0], self.head_k_dim, self.head_v_dim
        zero_state = x.new_zeros(1, H, K, V, dtype=torch.float32)
        recurrent = torch.stack([torch.cat([s if s is not None else zero_state for s in doc], 0)
                                 for doc in states])  # [N, S, H, K, V]
        if not self.use_short_conv:
            return RecurrentState(recurrent, ())
        convs = []
        for i, module in enumerate((self.q_conv1d, self.k_conv1d, self.v_conv1d)):
            zero = x.new_zeros(1, module.channels, module.kernel_size - 1)
            convs.append(torch.stack([torch.cat([c[i] if c[i] is not None else zero for c in doc], 0)
                                      for doc in conv_states]))  # [N, S, C, W-1]
        return RecurrentState(recurrent, tuple(convs))

    def _check_cache(self, cache: RecurrentState, num_seqs: int) -> None:
        H, S = self.A_log.shape[0], self.num_streams
        expected = (num_seqs, S, H, self.head_k_dim, self.head_v_dim)
        if tuple(cache.recurrent.shape) != expected:
            raise ValueError(f"MoMAttention: cache.recurrent has shape {tuple(cache.recurrent.shape)}, expected "
                             f"[N, S, H, K, V] = {expected} (S = memories + shared); pass the state this layer "
                             "returned for the same sequences")
        if self.use_short_conv and len(cache.conv) != 3:
            raise ValueError(f"MoMAttention: cache.conv holds {len(cache.conv)} states, expected 3 (q, k, v)")


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows [offs[s-1], offs[s]) of x [R, D] times weight[s] [F, D] transposed -> [R, F] (offs int32 [S],
    non-decreasing, last = R). Under autocast both operands run in the autocast dtype."""
    if not offs.is_contiguous() or offs.shape != weight.shape[:1]:
        raise ValueError(f"grouped_linear: offs must be a contiguous [S] = [{weight.shape[0]}] tensor, got shape "
                         f"{tuple(offs.shape)} and strides {offs.stride()}")
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
    return torch._grouped_mm(x, weight.transpose(1, 2), offs=offs)


def _to_segments(state: torch.Tensor) -> torch.Tensor:
    """Cache layout [N, S, ...] -> buffer segment order [S * N, ...] (stream-major, like the plan)."""
    return state.transpose(0, 1).flatten(0, 1)


def _from_segments(state: torch.Tensor, num_streams: int) -> torch.Tensor:
    """Buffer segment order [S * N, ...] -> cache layout [N, S, ...]."""
    return state.unflatten(0, (num_streams, -1)).transpose(0, 1).contiguous()
