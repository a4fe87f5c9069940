import numpy as np
import pytest
import torch

from mom_train.config import ConfigError, MQARConfig, load_config
from mom_train.data import build_loader
from mom_train.data.mqar import BOS_ID, generate_mqar, key_value_ranges, recall_accuracy

OVERRIDES = ["training.seq_len=64", "training.micro_batch_size=4", "model.vocab_size=256",
             "training.warmup_steps=1", "training.steps=10"]


def _cfg(*extra):
    return load_config(None, OVERRIDES + list(extra))


def test_batches_deterministic_per_seed_and_distinct_across_seeds_ranks_splits():
    a = next(build_loader(_cfg()))
    b = next(build_loader(_cfg()))
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    assert a.input_ids.shape == (1, 256) and a.cu_seqlens.tolist() == [0, 64, 128, 192, 256]
    for other in (next(build_loader(_cfg("run.seed=7"))), next(build_loader(_cfg(), dp_rank=1, dp_size=2)),
                  next(build_loader(_cfg(), split="eval")), next(build_loader(_cfg(), seed_offset=1))):
        assert not torch.equal(a.input_ids, other.input_ids)


def test_answers_recoverable_only_from_context():
    cfg = MQARConfig(num_pairs=8, num_queries=8, vocab_size=256)
    ids, labels = generate_mqar(cfg, 64, 512, np.random.default_rng(0))
    keys_range, values_range = key_value_ranges(256)
    seen: dict[int, set[int]] = {}
    for row, lab in zip(ids.tolist(), labels.tolist()):
        assert row[0] == BOS_ID
        keys, values = row[1:17:2], row[2:18:2]
        assert len(set(keys)) == 8 and all(k in keys_range for k in keys) and all(v in values_range for v in values)
        pairs = dict(zip(keys, values))
        answer_pos = [t for t, x in enumerate(lab) if x != -100]
        assert len(answer_pos) == 8
        for t in answer_pos:
            # the answer equals the value paired with the query key earlier in this sequence
            assert lab[t] == row[t] == pairs[row[t - 1]]
            seen.setdefault(row[t - 1], set()).add(lab[t])
        assert all(x == 0 for x in row[33:])
    # the same key maps to many different values across sequences
    assert max(len(v) for v in seen.values()) > 5


def test_too_short_seq_len_is_a_config_error():
    with pytest.raises(ConfigError, match="seq_len"):
        build_loader(_cfg("training.seq_len=32"))


def test_recall_accuracy_counts_answers():
    """An answer counts as right when the logits one position before it pick it; other positions never count."""
    cfg = MQARConfig(num_pairs=4, num_queries=2, vocab_size=32)
    ids, labels = generate_mqar(cfg, 16, 3, np.random.default_rng(1))
    # a perfect predictor: logits at t point at the token at t+1
    logits = torch.full((3, 16, 32), -1.0)
    logits[:, :-1].scatter_(2, ids[:, 1:, None], 1.0)
    assert [x.item() for x in recall_accuracy(logits, labels)] == [6, 6]
    rows, answers = (labels != -100).nonzero(as_tuple=True)
    # wrong at every position that does not predict an answer: nothing changes
    is_answer = torch.zeros(3, 16, dtype=torch.bool)
    is_answer[rows, answers - 1] = True
    wrong = logits.clone()
    wrong[~is_answer] = wrong[~is_answer].roll(1, -1)
    assert [x.item() for x in recall_accuracy(wrong, labels)] == [6, 6]
    # wrong one position before the first and the last answer: two fewer right
    for i in (0, len(rows) - 1):
        wrong[rows[i], answers[i] - 1] = logits[rows[i], answers[i] - 1].roll(1)
    assert [x.item() for x in recall_accuracy(wrong, labels)] == [4, 6]
    # predicting the answer at its own position (no shift) is wrong
    unshifted = torch.full((3, 16, 32), -1.0).scatter_(2, ids[:, :, None], 1.0)
    assert [x.item() for x in recall_accuracy(unshifted, labels)] == [0, 6]


def test_resume_gives_identical_batches():
    loader = build_loader(_cfg())
    for _ in range(3):
        next(loader)
    sd = loader.state_dict()
    expect = [next(loader) for _ in range(3)]
    resumed = build_loader(_cfg())
    resumed.load_state_dict(sd)
    for e in expect:
        got = next(resumed)
        assert torch.equal(got.input_ids, e.input_ids) and torch.equal(got.labels, e.labels)
    with pytest.raises(ConfigError, match="data-parallel size"):
        build_loader(_cfg(), dp_rank=0, dp_size=2).load_state_dict(sd)
