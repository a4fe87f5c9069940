"""Synthetic multi-query associative recall (MQAR, Zoology-style), generated on the fly from a seed.

Vocabulary of `vocab_size` symbols: 0 = pad, 1 = BOS, keys from [2, 2 + K), values from [2 + K, vocab_size)
with K = (vocab_size - 2) // 2, so keys and values never overlap. One sequence of seq_len tokens:

    BOS k1 v1 k2 v2 ... kn vn  q1 a1 q2 a2 ... qm am  0 0 ... 0

keys k1..kn are distinct, values are drawn uniformly (with replacement) per sequence, each query qj is one of
this sequence's keys (distinct queries) and aj its value. Labels are -100 except at the answers aj, which the
model predicts from the position of qj; since values are fresh in every sequence, an answer is recoverable
only from the context.
"""
from __future__ import annotations

import numpy as np
import torch

from mom_train.config import ConfigError, MQARConfig
from mom_train.data.packing import IGNORE_INDEX

PAD_ID = 0
BOS_ID = 1
NUM_SPECIAL = 2


def key_value_ranges(vocab_size: int) -> tuple[range, range]:
    """Disjoint symbol ranges (keys, values) of an MQAR vocabulary."""
    num_keys = (vocab_size - NUM_SPECIAL) // 2
    return range(NUM_SPECIAL, NUM_SPECIAL + num_keys), range(NUM_SPECIAL + num_keys, vocab_size)


def describe_task(cfg: MQARConfig) -> str:
    """The task and its chance level: a guess of a value symbol is right 1/num_values of the time."""
    _, values = key_value_ranges(cfg.vocab_size)
    return (f"MQAR, {cfg.num_pairs} key-value pairs then {cfg.num_queries} queries per sequence, values from "
            f"{len(values)} symbols: chance recall 1/{len(values)} = {1 / len(values):.3f}")


def check_mqar(cfg: MQARConfig, seq_len: int) -> None:
    """Raise ConfigError when the task does not fit seq_len or the vocabulary."""
    needed = 1 + 2 * cfg.num_pairs + 2 * cfg.num_queries
    if seq_len < needed:
        raise ConfigError(f"MQAR needs `training.seq_len` >= 1 + 2*num_pairs + 2*num_queries = {needed} "
                          f"(num_pairs={cfg.num_pairs}, num_queries={cfg.num_queries}), got seq_len={seq_len}; "
                          "raise training.seq_len or lower data.mqar.num_pairs / data.mqar.num_queries")
    if cfg.num_queries > cfg.num_pairs:
        raise ConfigError(f"`data.mqar.num_queries` = {cfg.num_queries} exceeds `data.mqar.num_pairs` = "
                          f"{cfg.num_pairs}; each query asks for a distinct key")
    keys, _ = key_value_ranges(cfg.vocab_size)
    if cfg.num_pairs > len(keys):
        raise ConfigError(f"`data.mqar.num_pairs` = {cfg.num_pairs} needs that many distinct keys but "
                          f"`data.mqar.vocab_size` = {cfg.vocab_size} has only {len(keys)} key symbols; "
                          f"raise data.mqar.vocab_size to >= {2 + 2 * cfg.num_pairs}")


def generate_mqar(cfg: MQARConfig, seq_len: int, num_seqs: int,
                  rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`num_seqs` MQAR sequences: (input_ids long [num_seqs, seq_len], labels long [num_seqs, seq_len])."""
    check_mqar(cfg, seq_len)
    n, m = cfg.num_pairs, cfg.num_queries
    keys_range, values_range = key_value_ranges(cfg.vocab_size)
    # distinct keys per row: the first n of a random permutation of the key symbols
    keys = rng.random((num_seqs, len(keys_range))).argsort(axis=1)[:, :n] + keys_range.start  # [S, n]
    values = rng.integers(values_range.start, values_range.stop, size=(num_seqs, n))  # [S, n]
    # distinct queried pairs per row
    which = rng.random((num_seqs, n)).argsort(axis=1)[:, :m]  # [S, m]
    query_keys = np.take_along_axis(keys, which, axis=1)  # [S, m]
    answers = np.take_along_axis(values, which, axis=1)  # [S, m]

    ids = np.full((num_seqs, seq_len), PAD_ID, dtype=np.int64)
    labels = np.full((num_seqs, seq_len), IGNORE_INDEX, dtype=np.int64)
    ids[:, 0] = BOS_ID
    ids[:, 1:1 + 2 * n:2] = keys
    ids[:, 2:2 + 2 * n:2] = values
    q0 = 1 + 2 * n
    ids[:, q0:q0 + 2 * m:2] = query_keys
    ids[:, q0 + 1:q0 + 1 + 2 * m:2] = answers
    labels[:, q0 + 1:q0 + 1 + 2 * m:2] = answers
    return torch.from_numpy(ids), torch.from_numpy(labels)


def recall_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Answers predicted right from the previous position.

    logits [B, T, V], labels [B, T] (-100 = not an answer) -> (num_correct long scalar, num_total long scalar).
    """
    pred = logits[:, :-1].argmax(dim=-1)  # [B, T-1]
    target = labels[:, 1:]  # [B, T-1]
    mask = target != IGNORE_INDEX
    return ((pred == target) & mask).sum(), mask.sum()
