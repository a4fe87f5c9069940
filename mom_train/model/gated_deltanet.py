"""Gated DeltaNet token mixer (the paper's one-memory baseline; MoM's per-memory update is the same rule).

Per head, with q, k L2-normalised inside the kernel and state S [K, V]:
    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   o_t = K^-1/2 S_t^T q_t
g = -exp(A_log) * softplus(a_proj(x) + dt_bias) (fp32), beta = sigmoid(b_proj(x)); q, k, v pass a short
causal conv with SiLU. Output: per-head gated RMSNorm with gate g_proj(x), then o_proj. Head counts come from
tensor shapes, so tensor-parallel (head-sharded) weights need no change here.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mom_train.config import ModelConfig
from mom_train.kernels import gated_delta_rule
from mom_train.model.cache import RecurrentState
from mom_train.model.conv import ShortConvolution, conv_fuses_with_delta_rule
from mom_train.model.linear import make_linear
from mom_train.model.norm import GatedRMSNorm, gated_norm_linear
from mom_train.kernels.cp import (
    ContextParallel, check_context_inputs, context_conv_states, context_parallel_gated_delta_rule, stream_chains)

# xavier-uniform gain of the reference linear-attention layers
LINEAR_INIT_GAIN = 2 ** -2.5
# widest value head the triton kernels take; wider value heads run as several heads sharing q, k, g, beta
MAX_KERNEL_VALUE_DIM = 256


def wide_value_gated_delta_rule(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    initial_state: torch.Tensor | None, output_final_state: bool, cu_seqlens: torch.Tensor | None, backend: str,
    context: ContextParallel | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`gated_delta_rule` (q, k L2-normalised inside) for any value width V: the columns of the state
    [K, V] evolve independently, so V is split into P equal parts run as P heads each.

    q, k [B, T, H, K]; v [B, T, H, V]; g, beta [B, T, H]; initial_state [N, H, K, V] -> (o [B, T, H, V],
    final state [N, H, K, V] | None). context: the rows are this rank's part of a sequence split over a
    context-parallel group (packed, one chain; no initial or final state).
    """
    V = v.shape[-1]
    parts = -(-V // MAX_KERNEL_VALUE_DIM)
    if V % parts:
        raise ValueError(f"value head dim {V} must split into equal parts of at most {MAX_KERNEL_VALUE_DIM}; "
                         "choose head_dim * expand_v as a multiple of such a part")
    if parts > 1:
        # head h becomes heads h*P .. h*P+P-1, each owning V/P value columns
        q, k = q.repeat_interleave(parts, 2), k.repeat_interleave(parts, 2)
        g, beta = g.repeat_interleave(parts, 2), beta.repeat_interleave(parts, 2)
        v = v.unflatten(-1, (parts, -1)).flatten(2, 3)  # [B, T, H*P, V/P]
        if initial_state is not None:
            # [N, H, K, V] -> [N, H*P, K, V/P]
            initial_state = initial_state.unflatten(-1, (parts, -1)).transpose(2, 3).flatten(1, 2)
    if context is not None:
        first, last = stream_chains(cu_seqlens, 1)
        o = context_parallel_gated_delta_rule(q, k, v, g, beta, cu_seqlens, first, last, context.continues_out,
                                              context.group, use_qk_l2norm_in_kernel=True, backend=backend,
                                              passes_through=context.single_document)
        state = None
    else:
        o, state = gated_delta_rule(q, k, v, g, beta, initial_state=initial_state,
                                    output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                                    use_qk_l2norm_in_kernel=True, backend=backend)
    if parts > 1:
        o = o.unflatten(2, (-1, parts)).flatten(-2)
        if state is not None:
            state = state.unflatten(1, (-1, parts)).transpose(2, 3).flatten(-2)
    return o, state


def init_decay_params(A_log: torch.Tensor, dt_bias: torch.Tensor, dt_min: float = 1e-3, dt_max: float = 0.1,
                      dt_floor: float = 1e-4) -> None:
    """A_log = log(U[1, 16]); dt_bias = softplus^-1(dt) with dt log-uniform in [dt_min, dt_max], floored."""
    with torch.no_grad():
        A_log.copy_(torch.empty_like(A_log).uniform_(1, 16).log())
        dt = torch.exp(torch.rand_like(dt_bias) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_floor)
        # inverse softplus: dt + log(1 - exp(-dt))
        dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
    # the optimizer reads this flag: no weight decay on decay parameters
    A_log._no_weight_decay = True
    dt_bias._no_weight_decay = True


class GatedDeltaNet(nn.Module):
    """x [B, T, D] (or packed [1, T, D] with cu_seqlens) -> (y [B, T, D], RecurrentState | None, {})."""

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        D, H = cfg.hidden_size, cfg.num_heads
        self.layer_idx = layer_idx
        self.head_k_dim = cfg.head_dim
        self.head_v_dim = int(cfg.head_dim * cfg.expand_v)
        self.kernel_backend = cfg.kernel_backend
        key_dim, value_dim = H * self.head_k_dim, H * self.head_v_dim
        self.q_proj = make_linear(D, key_dim, kind="column")
        self.k_proj = make_linear(D, key_dim, kind="column")
        self.v_proj = make_linear(D, value_dim, kind="column")
        self.b_proj = make_linear(D, H, kind="column")
        self.a_proj = make_linear(D, H, kind="column")
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

    def _conv_fused_training(self, x: torch.Tensor, cache: RecurrentState | None, use_cache: bool) -> bool:
        """Training on the Triton path: short convs and delta rule run as one function keeping only conv inputs."""
        return self.use_short_conv and conv_fuses_with_delta_rule(
            (self.q_conv1d, self.k_conv1d, self.v_conv1d), x, self.kernel_backend, cache is not None, use_cache)

    def reset_parameters(self) -> None:
        for linear in (self.q_proj, self.k_proj, self.v_proj, self.b_proj, self.a_proj, self.g_proj, self.o_proj):
            nn.init.xavier_uniform_(linear.weight, gain=LINEAR_INIT_GAIN)
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
        """x [B, T, D]; cache: this layer's state from an earlier call (states [N, H, K, V] fp32 and conv
        states [N, C, W-1], N = B or len(cu_seqlens) - 1); the call continues from it. context: x holds this
        rank's rows of a packed sequence split over a context-parallel group (states cross the ranks)."""
        check_context_inputs("GatedDeltaNet", context, x, cu_seqlens, cache, use_cache)
        conv_states = cache.conv if cache is not None and self.use_short_conv else (None, None, None)
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        # [B, T, H] fp32 log decay and write strength
        g = -self.A_log.float().exp() * F.softplus(self.a_proj(x).float() + self.dt_bias.float())
        beta = self.b_proj(x).sigmoid()
        if context is None and self._conv_fused_training(x, cache, use_cache):
            # training: short conv and delta rule as one function that keeps only the conv inputs
            from mom_train.kernels.gated_delta_rule.conv_chunk import conv_chunk_gated_delta_rule

            B, T, _ = x.shape
            if cu_seqlens is None:
                cu_seqlens = torch.arange(B + 1, device=x.device, dtype=torch.int32) * T
            o = conv_chunk_gated_delta_rule(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1),
                                            (self.q_conv1d.weight, self.k_conv1d.weight, self.v_conv1d.weight),
                                            g.flatten(0, 1), beta.flatten(0, 1), cu_seqlens, self.head_k_dim)
            gate = self.g_proj(x).unflatten(-1, (-1, self.head_v_dim))
            return gated_norm_linear(self.o_norm, self.o_proj, o.view(B, T, -1, self.head_v_dim), gate), None, {}
        if self.use_short_conv:
            if context is not None:
                first, last = stream_chains(cu_seqlens, 1)
                conv_states = context_conv_states((q, k, v), cu_seqlens, first, last, context,
                                                  self.q_conv1d.kernel_size)
            q, conv_q = self.q_conv1d(q, cu_seqlens, conv_states[0], use_cache)
            k, conv_k = self.k_conv1d(k, cu_seqlens, conv_states[1], use_cache)
            v, conv_v = self.v_conv1d(v, cu_seqlens, conv_states[2], use_cache)
        else:
            q, k, v = F.silu(q), F.silu(k), F.silu(v)
        # [B, T, H, K] / [B, T, H, V]; heads inferred from the projection width
        q = q.unflatten(-1, (-1, self.head_k_dim))
        k = k.unflatten(-1, (-1, self.head_k_dim))
        v = v.unflatten(-1, (-1, self.head_v_dim))
        initial_state = cache.recurrent if cache is not None else None
        o, state = wide_value_gated_delta_rule(q, k, v, g, beta, initial_state, use_cache, cu_seqlens,
                                               self.kernel_backend, context)
        y = gated_norm_linear(self.o_norm, self.o_proj, o, self.g_proj(x).unflatten(-1, (-1, self.head_v_dim)))
        new_cache = None
        if use_cache:
            new_cache = RecurrentState(state, (conv_q, conv_k, conv_v) if self.use_short_conv else ())
        return y, new_cache, {}
