"""AdamW groups, the LR schedule and valid-target counting (the trainer's loss normalisation is checked through
`train()` in test_grad_accum.py)."""
from __future__ import annotations

import math

import torch

from mom_train.data import build_loader
from mom_train.model import build_model
from mom_train.optim import WarmupCosine, param_groups
from mom_train.train import count_valid_targets
from tests.train.conftest import mqar_config


def test_param_groups_decay_matrices_and_embeddings_only(tmp_path):
    cfg = mqar_config(tmp_path)
    groups = param_groups(build_model(cfg.model), weight_decay=0.1)
    decay, no_decay = groups[0]["names"], groups[1]["names"]
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert "embed.weight" in decay
    assert any(n.endswith("mixer.memory_kv_proj") for n in decay) and any(n.endswith("router.weight") for n in decay)
    for name in no_decay:
        assert name.endswith(("A_log", "dt_bias", "bias")) or "norm" in name, name
    assert any(n.endswith("A_log") for n in no_decay) and any(n.endswith("dt_bias") for n in no_decay)
    assert any(n.endswith("attn_norm.weight") for n in no_decay)


def test_warmup_cosine():
    sched = WarmupCosine(lr=1.0, warmup=10, total=110, min_ratio=0.1)
    assert math.isclose(sched(0), 0.1) and math.isclose(sched(9), 1.0)
    assert math.isclose(sched(10), 1.0)
    assert math.isclose(sched(60), 0.55)
    assert math.isclose(sched(110), 0.1) and math.isclose(sched(500), 0.1)


def test_count_valid_targets_matches_model(tmp_path):
    cfg = mqar_config(tmp_path)
    model = build_model(cfg.model)
    batch = next(build_loader(cfg))
    # make every token of the first document a target, then cut it by an extra segment start at 20: the
    # target of position 19 (token 20) is dropped
    batch.labels[0, :40] = batch.input_ids[0, :40]
    batch.cu_seqlens = torch.cat([batch.cu_seqlens[:1], torch.tensor([20], dtype=torch.int32),
                                  batch.cu_seqlens[1:]])
    with torch.no_grad():
        out = model(batch.input_ids, cu_seqlens=batch.cu_seqlens, labels=batch.labels)
    assert count_valid_targets(batch) == int(out.num_valid)
