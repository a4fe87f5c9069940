"""Parameter counts of the paper's configs (meta device), the FLOPs formula and the decode state size."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from mom_train.config import ModelConfig, load_config
from mom_train.model import build_model, count_parameters, flops_per_token, state_bytes

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
ARCHS = ["gated_deltanet", "transformer", "mom"]

# (config file, parameters reported for that model by fla / the MoM paper, tied embeddings)
PAPER_COUNTS = [("gdn_340m.yaml", 442.4e6), ("mom_340m.yaml", 512.4e6), ("mom_1.3b.yaml", 1.553e9)]


@pytest.mark.parametrize("name,expected", PAPER_COUNTS, ids=[n for n, _ in PAPER_COUNTS])
def test_paper_config_sizes(name: str, expected: float):
    cfg = load_config(CONFIGS / name)
    counts = count_parameters(cfg.model)
    assert abs(counts["total"] - expected) / expected < 0.01, counts
    assert counts["embedding"] == cfg.model.vocab_size * cfg.model.hidden_size


def test_baselines_exact_sizes():
    # fla's GatedDeltaNet-340M (4 heads x 256, expand_v 2, MLP 2816, tied): 442,365,120 parameters
    assert count_parameters(load_config(CONFIGS / "gdn_340m.yaml").model)["total"] == 442_365_120
    # Transformer++ 340M class: 24 x (4 x 1024^2 attention + 3 x 1024 x 2816 MLP + 2 norms) + embedding + norm
    expected = 24 * (4 * 1024**2 + 3 * 1024 * 2816 + 2 * 1024) + 32000 * 1024 + 1024
    assert count_parameters(load_config(CONFIGS / "transformer_340m.yaml").model)["total"] == expected


def tiny(arch: str, **overrides) -> ModelConfig:
    cfg = ModelConfig(arch=arch, hidden_size=32, num_layers=2, num_heads=2, head_dim=16, vocab_size=97,
                      hidden_ratio=2)
    return dataclasses.replace(cfg, **overrides)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("arch", ARCHS)
def test_counts_match_a_real_model(arch: str, tied: bool):
    cfg = tiny(arch, tie_embeddings=tied)
    model = build_model(cfg)
    counts = count_parameters(cfg)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["embedding"] == 97 * 32 * (1 if tied else 2)
    if arch != "mom":
        assert counts["active_per_token"] == counts["total"]


def test_mom_active_parameters_are_topk_memories():
    # a token uses topk routed memories: the same as a model with only topk memories, plus the wider router
    cfg = tiny("mom", num_memories=4, topk=2)
    small = count_parameters(dataclasses.replace(cfg, num_memories=2))["total"]
    router_extra = cfg.num_layers * cfg.hidden_size * (cfg.num_memories - 2)
    assert count_parameters(cfg)["active_per_token"] == small + router_extra


def test_flops_formula_by_hand():
    cfg = tiny("gated_deltanet", expand_v=2.0)
    counts = count_parameters(cfg)
    # tied: every parameter except the embedding lookup is a matmul weight, and the tied head is one
    matmul = counts["total"]
    mixer = 2 * (6 * 16 * 32 + 2 * 64 * (3 * 16 + 2 * 32))
    assert flops_per_token(cfg, 2048) == 6 * matmul + 3 * 2 * mixer
    untied = tiny("gated_deltanet", expand_v=2.0, tie_embeddings=False)
    assert flops_per_token(untied, 2048) == flops_per_token(cfg, 2048)

    attn = tiny("transformer")
    grow = flops_per_token(attn, 4096) - flops_per_token(attn, 2048)
    assert grow == 3 * 2 * (2 * 2048 * 32)


def cache_bytes(cfg: ModelConfig, seq_len: int) -> int:
    """Bytes of the recurrent states or key/value caches a real fp32 model returns after seq_len tokens."""
    model = build_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, seq_len))
    with torch.no_grad():
        cache = model(ids, use_cache=True).cache
    tensors = [t for layer in cache.layers
               for t in ((layer.k, layer.v) if cfg.arch == "transformer" else (layer.recurrent,))]
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("overrides", [
    {"arch": "transformer"}, {"arch": "gated_deltanet"}, {"arch": "gated_deltanet", "expand_v": 3.0},
    {"arch": "mom"}, {"arch": "mom", "shared_memory": False}, {"arch": "mom", "num_memories": 3, "topk": 1},
], ids=["transformer", "gdn", "gdn-expand3", "mom-e4k2-shared", "mom-e4k2", "mom-e3k1-shared"])
def test_state_bytes_match_the_decode_cache(overrides: dict):
    cfg = tiny(**overrides)
    assert state_bytes(cfg, 7)["total"] == cache_bytes(cfg, 7)
    if cfg.arch == "transformer":
        # the key/value cache grows with the sequence
        assert state_bytes(cfg, 14)["total"] == 2 * state_bytes(cfg, 7)["total"]


def test_mom_active_state_is_topk_memories():
    # a token reads and writes its topk memories and the shared one: the whole state of a model with only those
    cfg = tiny("mom", num_memories=4, topk=2)
    assert state_bytes(cfg, 7)["active"] == cache_bytes(dataclasses.replace(cfg, num_memories=2), 7)
    assert state_bytes(cfg, 7)["active"] < state_bytes(cfg, 7)["total"]
