"""Held-out evaluation: loss and perplexity on text, loss and recall accuracy on MQAR.

Each data-parallel rank scores `eval.num_batches` batches of its shard of the eval split (text: one pass at
most; MQAR: a held-out stream, split "eval" with seed offset EVAL_SEED_OFFSET, never seen in training); the
sums are all-reduced once. `run_eval` does the same for a saved checkpoint (`mom-train eval`).
"""
from __future__ import annotations

import math
import os
import sys

import torch
from torch import nn

from mom_train.checkpoint import open_checkpoint
from mom_train.config import Config
from mom_train.data import build_loader, recall_accuracy
from mom_train.parallel.dims import ParallelDims
from mom_train.precision import autocast_context

# added to run.seed for the held-out MQAR stream
EVAL_SEED_OFFSET = 1_000_003


def build_eval_loader(cfg: Config, dims: ParallelDims):
    """The eval-split loader of this rank (finite for text)."""
    if cfg.data.source == "mqar":
        return build_loader(cfg, dims.dp_rank, dims.dp_size, split="eval", seed_offset=EVAL_SEED_OFFSET)
    return build_loader(cfg, dims.dp_rank, dims.dp_size, split="eval", max_epochs=1)


def check_eval_data(cfg: Config, dims: ParallelDims) -> None:
    """Open the eval split once, so a training with eval.interval > 0 fails at the start, not at its first
    evaluation, when the eval data is missing (ConfigError naming data.eval_path)."""
    build_eval_loader(cfg, dims).close()


@torch.no_grad()
def evaluate(model: nn.Module, cfg: Config, dims: ParallelDims) -> dict[str, float]:
    """{"eval_loss", "eval_ppl"} for text, {"eval_loss", "eval_recall"} for MQAR, over all ranks.

    model: the plain (not DDP-wrapped) CausalLM, or its tensor-parallel shard (then the tp ranks evaluate
    together: each scores its token shard, and counts are taken on the first); it is left in eval mode.
    """
    is_mqar = cfg.data.source == "mqar"
    model.eval()
    loader = build_eval_loader(cfg, dims)
    # loss_sum, num_valid, num_correct, num_answers
    sums = torch.zeros(4, dtype=torch.float64, device=dims.device)
    # a context-parallel group evaluates whole sequences on its first rank (the others add zeros)
    num_batches = cfg.eval.num_batches if dims.cp_rank == 0 else 0
    # tp ranks see the same batches: each adds its token shard's loss, the first adds the counts
    counts = 1.0 if dims.tp_rank == 0 else 0.0
    try:
        for _, batch in zip(range(num_batches), loader):
            input_ids, labels = batch.input_ids.to(dims.device), batch.labels.to(dims.device)
            cu_seqlens = batch.cu_seqlens.to(dims.device)
            with autocast_context(cfg.training.precision, dims.device):
                out = model(input_ids, cu_seqlens=cu_seqlens, labels=labels)
                logits = out.logits
                if is_mqar and logits is None:
                    logits = model(input_ids, cu_seqlens=cu_seqlens).logits
            sums[0] += out.loss_sum.double()
            sums[1] += out.num_valid.double() * counts
            if is_mqar:
                correct, total = recall_accuracy(logits, labels)
                sums[2] += correct.double() * counts
                sums[3] += total.double() * counts
    finally:
        loader.close()
    loss_sum, num_valid, correct, total = dims.all_reduce_(sums).tolist()
    loss = loss_sum / num_valid if num_valid else math.nan
    if is_mqar:
        return {"eval_loss": loss, "eval_recall": correct / total if total else math.nan}
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 80.0))}


def _note(text: str) -> None:
    # stdout carries the scores as JSON
    print(text, file=sys.stderr)


def run_eval(checkpoint: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, float]:
    """Evaluate a checkpoint (a step directory or a run directory) in this process; overrides apply to the
    checkpoint's config (e.g. eval.num_batches=50, data.eval_path=...)."""
    path, cfg, model = open_checkpoint(checkpoint, overrides, note=_note)
    dims = ParallelDims(device=next(model.parameters()).device)
    scores = evaluate(model, cfg, dims)
    return {"checkpoint": str(path), "step": int(path.name.split("_")[-1]), **scores}
