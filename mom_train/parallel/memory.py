"""Per-rank memory of a training run, estimated from its config before launch (`mom-train train --dry-run`).

Training state (exact for our engine, fp32 master weights):
    parameters 4 B, gradients 4 B, AdamW moments 8 B per parameter a rank holds (its tp shard);
    ZeRO shards the moments (stage >= 1), DeepSpeed's stage 2 the gradients too, stage 3 the parameters,
    over the N = dp x cp ranks of a tp rank. Our engine's stage 2 keeps the whole gradient buffer.
Activations (an estimate): the bf16 tensors one micro-batch keeps for backward, per token and layer
    2 B x [8 D / s + 2 F / tp + W / tp]
with D the hidden size, F the MLP width, W the token mixer's width (MoM: (topk + shared) x (2 key + value +
2 heads) + key + 2 value, over the buffer rows; Gated DeltaNet: 2 key + 3 value + 2 heads; Transformer++:
4 D), s = tp with sequence parallelism (1 without), tokens = micro-batch tokens / cp. With
activation_checkpointing only each block's fp32 input is kept (4 B x D / s per token and layer) plus one
block's activations at a time. Calibrated against MoM-340M on an H200 (8 x 2048 tokens, CUDA graphs: 25.2 GiB
measured peak; this estimate gives 25.7 GiB); allocator slack, CUDA graph pools and the largest transient
(the LM head's chunk of logits, ~0.5 GiB) come on top.
"""
from __future__ import annotations

from mom_train.config import Config, mlp_intermediate_size

GIB = 2 ** 30


def mixer_width(cfg: Config) -> int:
    """Activation values per token of one token mixer (see the module doc)."""
    m = cfg.model
    key = m.num_heads * m.head_dim
    value = int(key * m.expand_v)
    if m.arch == "mom":
        streams = m.topk + int(m.shared_memory)
        return streams * (2 * key + value + 2 * m.num_heads) + key + 2 * value
    if m.arch == "gated_deltanet":
        return 2 * key + 3 * value + 2 * m.num_heads
    return 4 * m.hidden_size


def estimate_memory(cfg: Config, world_size: int, params_per_rank: int) -> dict[str, float]:
    """Bytes per rank: parameters, gradients, optimizer, activations, total (see the module doc)."""
    m, t, p = cfg.model, cfg.training, cfg.parallel
    num = max(1, world_size // p.tp)
    stage = p.zero_stage if num > 1 else 0
    params = 4 * params_per_rank / (num if stage == 3 else 1)
    grads = 4 * params_per_rank / (num if stage == 3 or (stage == 2 and p.uses_deepspeed) else 1)
    optimizer = 8 * params_per_rank / (num if stage >= 1 else 1)
    seq_shard = p.tp if p.tp > 1 and p.sequence_parallel else 1
    tokens = t.micro_batch_size * t.seq_len / p.cp
    mlp = mlp_intermediate_size(m.hidden_size, m.hidden_ratio, m.intermediate_size)
    per_layer = 2 * (8 * m.hidden_size / seq_shard + 2 * mlp / p.tp + mixer_width(cfg) / p.tp)
    if t.activation_checkpointing:
        activations = tokens * (m.num_layers * 4 * m.hidden_size / seq_shard + per_layer)
    else:
        activations = tokens * m.num_layers * per_layer
    total = params + grads + optimizer + activations
    return {"parameters": params, "gradients": grads, "optimizer": optimizer, "activations": activations,
            "total": total}


def describe_memory(cfg: Config, world_size: int, params_per_rank: int) -> str:
    est = estimate_memory(cfg, world_size, params_per_rank)
    parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in est.items() if k != "total")
    p = cfg.parallel
    engine = "DeepSpeed" if p.uses_deepspeed else "our engine"
    return (f"memory per rank (GiB, ZeRO stage {p.zero_stage} on {engine}): {parts}; total "
            f"~{est['total'] / GIB:.1f} (activations estimated)")
