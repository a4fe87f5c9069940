"""The training loop: `train(cfg)` builds everything, resumes if asked, and runs `while step < steps:`.

One optimizer step on each data-parallel rank:
    fetch grad_accum micro-batches (CPU) -> count their valid targets on the host -> sum the count over ranks
    (gloo, no GPU sync) -> per micro-batch: forward, backward of
        loss_sum / global_valid * (dp x cp) + aux_loss_coef * cp * aux_loss / grad_accum
    (gradients are averaged over the dp x cp ranks, so the CE gradient is that of the global token mean; the
    gradient all-reduce runs on the last micro-batch only. The cp and tp ranks of one data-parallel replica
    load the same micro-batches: each cp rank runs its part of every packed sequence, states passed between
    them, and each tp rank its heads, scoring its token shard, so every token's loss is counted once and
    each rank's aux loss is its share) -> clip -> AdamW (skipped on the device when the loss or the gradient
    is not finite; with parallel.zero_stage=1 each rank updates its shard) -> metrics on the device.
Host syncs: one per logging interval (metrics), plus one per step with training.nan_policy=stop (to stop at
the first bad step). SIGTERM/SIGINT finish the current step, save a checkpoint and return normally.
"""
from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from mom_train.checkpoint import PreemptionHandler, find_resume, rng_state, save_checkpoint, set_rng_state
from mom_train.config import Config
from mom_train.data import IGNORE_INDEX, Batch, build_loader
from mom_train.engine import build_engine
from mom_train.errors import TrainingFault
from mom_train.eval import check_eval_data, evaluate
from mom_train.faults import FAULTS, Rescue, fetch_batches
from mom_train.kernels.cp import ContextParallel
from mom_train.metrics import MetricsLogger, Window, peak_flops, run_header
from mom_train.model import build_model, flops_per_token
from mom_train.parallel.context import shard_batch
from mom_train.parallel.dims import ParallelDims, init_parallel, teardown
from mom_train.parallel.parallelize import parallelize
from mom_train.rundir import hold_run_dir


class NonFiniteError(TrainingFault):
    """Raised with training.nan_policy=stop after the last good state was saved."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def count_valid_targets(batch: Batch) -> int:
    """Targets the model will score in this micro-batch (host-side, CPU tensors): position t predicts
    labels[t+1] unless it is -100, t+1 starts a segment of cu_seqlens, or t is the last position."""
    valid = batch.labels[:, 1:] != IGNORE_INDEX  # [B, T-1]
    T = batch.labels.shape[1]
    starts = batch.cu_seqlens.long()
    starts = starts[(starts > 0) & (starts < T)]
    valid[:, starts - 1] = False
    return int(valid.sum())


def to_device(tensors: tuple[torch.Tensor, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """CPU tensors on `device`, copied asynchronously from pinned memory on CUDA."""
    if device.type != "cuda":
        return tensors
    return tuple(t.pin_memory().to(device, non_blocking=True) for t in tensors)


def micro_batch_inputs(batch: Batch, dims: ParallelDims) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                   ContextParallel | None]:
    """(input_ids, labels, cu_seqlens, context) of this rank on its device: the whole micro-batch, or under
    context parallelism this rank's part of its packed sequence (labels then shifted targets)."""
    if dims.cp_size == 1:
        return (*to_device((batch.input_ids, batch.labels, batch.cu_seqlens), dims.device), None)
    input_ids, targets, cu_seqlens, context = shard_batch(batch.input_ids, batch.labels, batch.cu_seqlens,
                                                          dims.cp_group)
    return (*to_device((input_ids, targets, cu_seqlens), dims.device), context)


def main_print(dims: ParallelDims) -> Callable[[str], None]:
    """print on rank 0 only: notes before the progress bar exists."""
    return lambda text: print(text, flush=True) if dims.is_main else None


def train(cfg: Config) -> dict[str, Any]:
    """Train (or resume) the run described by `cfg`; return the last logged and evaluated metrics.

    Returns normally after the last step and after a preemption signal (checkpoint saved; result has
    "preempted": True). Raises NonFiniteError with training.nan_policy=stop, and a TrainingFault (after saving
    the last good state where it can, see faults.py) when the data, the disk or another I/O fails.
    """
    dims = init_parallel(cfg)
    rescue = Rescue(dims, cfg.run.path)
    try:
        with PreemptionHandler() as preempt, hold_run_dir(cfg.run.path, dims, main_print(dims)):
            try:
                result = _train(cfg, dims, preempt, rescue)
            except FAULTS as e:
                raise rescue.fault(e) from e
    except BaseException:
        teardown(dims, clean=False)
        raise
    teardown(dims)
    return result


def _train(cfg: Config, dims: ParallelDims, preempt: PreemptionHandler, rescue: Rescue) -> dict[str, Any]:
    t, run_dir = cfg.training, cfg.run.path
    # everything that can refuse the run is checked before anything is written into the run dir
    resume = find_resume(cfg, dims, main_print(dims))
    if cfg.eval.interval > 0:
        check_eval_data(cfg, dims)
    if dims.is_main:
        cfg.dump(run_dir / "config.yaml")

    # model: identical init on every rank (tensor parallelism keeps each rank's shard of it), then one RNG
    # stream per data/context-parallel rank (shared by its tp ranks, which see the same data)
    grad_accum = cfg.grad_accum_steps(dims.dp_size)
    seed_everything(cfg.run.seed)
    engine = build_engine(parallelize(build_model(cfg.model), dims, cfg), cfg, dims, grad_accum,
                          log=main_print(dims))
    model = engine.module
    seed_everything(cfg.run.seed + dims.grad_rank)
    loader = build_loader(cfg, dims.dp_rank, dims.dp_size, split="train")
    tokens_per_step = grad_accum * dims.dp_size * t.micro_batch_size * t.seq_len

    step, tokens, num_skipped = 0, 0, 0
    if resume is not None and resume.weights_only:
        # imported weights: optimizer, schedule, data stream and RNG start fresh
        engine.load_model(resume.model)
    elif resume is not None:
        state = resume.train_state
        engine.load_state_dict({"model": resume.model, "optimizer": resume.optimizer,
                                "schedule": state["schedule"]})
        loader.load_state_dict(resume.rank["data"])
        set_rng_state(resume.rank["rng"])
        step, tokens, num_skipped = state["step"], state["tokens"], state["skipped_steps"]

    main_print(dims)(run_header(cfg, dims, model))
    logger = MetricsLogger(cfg, dims, step)
    rescue.closers += [logger.close, loader.close]
    if resume is not None and resume.weights_only:
        source = resume.train_state.get("source", "elsewhere")
        logger.message(f"started from the weights in {resume.path} (imported from {source}) with a fresh "
                       "optimizer, LR schedule from step 0 and the data stream from its start")
    elif resume is not None:
        logger.message(f"resumed from {resume.path} at step {step}")
    del resume

    def save(at_step: int, data_state: dict, rng: dict) -> None:
        engine_state = engine.state_dict()
        main = {"model": engine_state["model"], "optimizer": engine_state["optimizer"],
                "train_state": {"step": at_step, "tokens": tokens, "skipped_steps": num_skipped,
                                "schedule": engine_state["schedule"], "dp_size": dims.dp_size,
                                "layout": dims.describe()}}
        # left set when the save fails: a fault while saving is not retried
        rescue.saving = True
        path = save_checkpoint(run_dir, at_step, main, {"data": data_state, "rng": rng}, cfg, dims,
                               cfg.checkpoint.keep)
        rescue.saving = False
        logger.message(f"saved checkpoint {path}")

    rescue.save = save

    window = Window(dims.device)
    flops = flops_per_token(cfg.model, t.seq_len)
    peak = peak_flops(dims.device)
    coef = cfg.model.aux_loss_coef
    result: dict[str, Any] = {"preempted": False}
    # throughput window: wall time since the last log minus time spent evaluating and checkpointing
    last_log, last_log_tokens, paused = time.perf_counter(), tokens, 0.0
    stats: dict = {}

    def stop_if_nonfinite(at_step: int, flag: torch.Tensor, state_before: tuple) -> None:
        """training.nan_policy=stop: if step `at_step` was non-finite (flag: device scalar), save the state
        before it and raise. The skipped update left parameters and moments at the state after at_step - 1."""
        if not flag.item():
            return
        save(at_step - 1, *state_before)
        logger.close()
        loader.close()
        raise NonFiniteError(f"non-finite loss or gradient norm at step {at_step} (training.nan_policy=stop); "
                             f"saved the last good state as checkpoint step {at_step - 1} in {run_dir}. "
                             "Lower training.lr or raise warmup, check the data, or resume with "
                             "training.nan_policy=skip to skip such steps")

    # nan_policy=stop: (step, non-finite flag, state before it) of a step whose flag has not been read. Reading
    # it at once would wait for the whole step on the device; it is read during the next step instead
    unchecked: tuple | None = None
    model.train()
    while step < t.steps:
        # the state before this step, kept to save "the last good state" if this step fails or is non-finite
        before = (loader.state_dict(), rng_state())
        rescue.mark(step, lambda before=before: before)
        batches = fetch_batches(loader, grad_accum)
        stats = batches[-1].stats
        # the cp and tp ranks of a data-parallel replica hold the same micro-batches: count each replica once
        global_valid = dims.sum_int(sum(count_valid_targets(b) for b in batches)) // (dims.cp_size * dims.tp_size)
        lr = engine.set_lr(step)
        # the global count is a host number: scaling by it launches no transfer. Gradients are averaged over
        # the dp x cp ranks
        ce_scale = dims.grad_size / max(global_valid, 1)
        step_loss = torch.zeros((), device=dims.device)
        step_aux = torch.zeros((), device=dims.device)
        step_load = None
        for i, batch in enumerate(batches):
            input_ids, labels, cu_seqlens, context = micro_batch_inputs(batch, dims)
            # a cp or tp rank's aux loss is its share of its replica's (gradients are averaged over dp x cp)
            out = engine.forward_backward(input_ids, labels, cu_seqlens, ce_scale, coef * dims.cp_size / grad_accum,
                                          last=i == grad_accum - 1, context=context)
            # consumed (in stream order) before the next micro-batch overwrites a graphed step's outputs
            step_loss += out.loss_sum.float()
            step_aux += out.aux_loss.float() / grad_accum
            if out.router_load is not None:
                load = out.router_load.float() / grad_accum
                step_load = load if step_load is None else step_load + load
        if unchecked is not None:
            # the previous step's flag, read while this step's forward and backward run on the device (no
            # stall); the previous update was skipped if it is set, and this one has not run yet
            stop_if_nonfinite(*unchecked)
            unchecked = None
        grad_norm, nonfinite = engine.step(step_loss)
        window.add(step_loss, global_valid, step_aux, step_load, grad_norm, nonfinite)
        step += 1
        tokens += tokens_per_step
        logger.advance(step)
        rescue.mark(step, lambda: (loader.state_dict(), rng_state()))

        if t.nan_policy == "stop":
            unchecked = (step, nonfinite, before)
        stopping = bool(dims.max_int(int(preempt.requested)))
        interval = cfg.checkpoint.interval
        saving = (interval > 0 and step % interval == 0) or step == t.steps or stopping
        do_eval = cfg.eval.interval > 0 and (step % cfg.eval.interval == 0 or step == t.steps)
        if unchecked is not None and (saving or do_eval or step % cfg.logging.interval == 0):
            # the step's state is read (logged, saved or evaluated) now: its flag first
            stop_if_nonfinite(*unchecked)
            unchecked = None

        # a checkpoint step is always logged, so the saved counters are exact
        if step % cfg.logging.interval == 0 or saving:
            record = window.reduce(dims)
            now = time.perf_counter()
            num_skipped += record["skipped_steps"]
            tokens_per_s = (tokens - last_log_tokens) / max(now - last_log - paused, 1e-9)
            record.update(step=step, lr=lr, tokens=tokens, tokens_per_s=tokens_per_s,
                          skipped_steps_total=num_skipped, data=stats)
            if peak is not None:
                record["mfu"] = flops * tokens_per_s / (peak * dims.world_size)
            if dims.device.type == "cuda":
                record["peak_mem_gib"] = torch.cuda.max_memory_allocated(dims.device) / 2 ** 30
            logger.log(record)
            result.update(record)
            last_log, last_log_tokens, paused = now, tokens, 0.0

        pause_start = time.perf_counter()
        # saved before evaluating, so a failing evaluation cannot lose the step
        if saving:
            save(step, loader.state_dict(), rng_state())
            logger.pause("checkpoint", time.perf_counter() - pause_start)
        if do_eval and not stopping:
            eval_start = time.perf_counter()
            with engine.evaluation():
                scores = evaluate(model, cfg, dims)
            model.train()
            logger.log({"step": step, **scores})
            logger.message(f"eval at step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in scores.items()))
            result.update(scores)
            logger.pause("eval", time.perf_counter() - eval_start)
        paused += time.perf_counter() - pause_start
        if stopping:
            logger.message(f"preempted (signal {preempt.signum}): saved step {step}, exiting")
            result["preempted"] = True
            break

    result["step"] = step
    final = {k: result[k] for k in ("loss", "eval_loss", "eval_ppl", "eval_recall") if k in result}
    if not final and not result["preempted"]:
        logger.message(f"the run had already finished: step {step} of training.steps = {t.steps}; raise "
                       "training.steps to train further, or use a new run.name")
    else:
        logger.message(f"finished at step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in final.items()
                                                                if v is not None))
    logger.close()
    loader.close()
    return result
