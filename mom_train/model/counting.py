"""Parameter counts and training FLOPs per token of a model config (the model is built on the meta device).

Training FLOPs per token (forward + backward = 3 x forward, a multiply-add = 2 FLOPs):
    6 * P_matmul + 3 * L * F_mixer
P_matmul = active parameters used in matmuls: every active non-embedding parameter plus the LM head
(the input embedding is a lookup; with tied embeddings the one shared matrix counts as the head). For MoM
only topk of the num_memories routed memories' k/v/beta/a projections are active for a token.
F_mixer, the forward cost of the token mixing itself per token and layer:
    transformer: 2 * seq_len * H * d_head (QK^T and AV over the causal average context seq_len / 2)
    gated delta rule, chunked with C = min(64, seq_len), per head and memory stream (1 for Gated DeltaNet,
    topk + shared for MoM): 6 * d_k * d_v (W S, Q S and the state update K^T V_new)
    + 2 * C * (3 * d_k + 2 * d_v) (the C x C blocks K K^T, Q K^T, T (beta K), T (beta V), (Q K^T) V_new).
Elementwise work (norms, convs, gates, softmax) and the C x C triangular solve are left out.

Decode state of one sequence (what the model carries from one token to the next), in bytes at 4 per element:
    gated delta rule, per layer and memory stream: H * d_k * d_v (the fp32 state matrices S);
    Gated DeltaNet has 1 stream, MoM num_memories + shared (total) of which topk + shared are read and written
    per token (active); transformer: the key/value cache, 2 * H * d_head * seq_len per layer (total = active).
The short convs' windows (conv_size - 1 inputs per channel) are left out: they are not a memory of the context.
"""
from __future__ import annotations

import torch

from mom_train.config import ModelConfig
from mom_train.model.lm import build_model

CHUNK_SIZE = 64
# bytes per state element: recurrent states are kept in fp32 (a bf16 key/value cache would take half)
STATE_ELEMENT_BYTES = 4


def count_parameters(cfg: ModelConfig) -> dict[str, int]:
    """{"total", "embedding", "active_per_token"}: total counts a tied embedding once; embedding is the
    input embedding plus the LM head when untied; active_per_token = total minus, for MoM, the routed
    memories a token does not use (num_memories - topk of them per layer)."""
    with torch.device("meta"):
        model = build_model(cfg)
    total = sum(p.numel() for p in model.parameters())
    embedding = sum(p.numel() for p in {model.embed.weight, model.head_weight})
    inactive = 0
    if cfg.arch == "mom":
        key_dim = cfg.num_heads * cfg.head_dim
        value_dim = int(cfg.num_heads * cfg.head_dim * cfg.expand_v)
        # k, v, beta and decay projections of one routed memory
        per_memory = cfg.hidden_size * (key_dim + value_dim + 2 * cfg.num_heads)
        inactive = cfg.num_layers * (cfg.num_memories - cfg.topk) * per_memory
    return {"total": total, "embedding": embedding, "active_per_token": total - inactive}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token at context seq_len (formula in the module docstring)."""
    counts = count_parameters(cfg)
    head = cfg.vocab_size * cfg.hidden_size
    matmul_params = counts["active_per_token"] - counts["embedding"] + head
    d_k = cfg.head_dim
    d_v = int(cfg.head_dim * cfg.expand_v)
    if cfg.arch == "transformer":
        mixer = 2 * seq_len * cfg.num_heads * d_k
    else:
        streams = cfg.topk + int(cfg.shared_memory) if cfg.arch == "mom" else 1
        chunk = min(CHUNK_SIZE, seq_len)
        mixer = streams * cfg.num_heads * (6 * d_k * d_v + 2 * chunk * (3 * d_k + 2 * d_v))
    return float(6 * matmul_params + 3 * cfg.num_layers * mixer)


def state_bytes(cfg: ModelConfig, seq_len: int) -> dict[str, int]:
    """{"total", "active"}: bytes of one sequence's decode state after seq_len tokens (formula in the module
    docstring); active is the part a token reads and writes (MoM: its topk memories and the shared one)."""
    d_k = cfg.head_dim
    d_v = int(cfg.head_dim * cfg.expand_v)
    if cfg.arch == "transformer":
        kv_cache = STATE_ELEMENT_BYTES * cfg.num_layers * 2 * cfg.num_heads * d_k * seq_len
        return {"total": kv_cache, "active": kv_cache}
    per_stream = STATE_ELEMENT_BYTES * cfg.num_layers * cfg.num_heads * d_k * d_v
    if cfg.arch == "mom":
        shared = int(cfg.shared_memory)
        return {"total": (cfg.num_memories + shared) * per_stream, "active": (cfg.topk + shared) * per_stream}
    return {"total": per_stream, "active": per_stream}
