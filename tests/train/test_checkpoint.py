"""Atomic checkpoints: a failure in the middle of a write leaves the previous checkpoint and `latest` intact."""
from __future__ import annotations

import os
import random
import signal

import numpy as np
import pytest
import torch

import mom_train.checkpoint as ckpt
from mom_train.errors import CheckpointError
from mom_train.parallel.dims import ParallelDims
from tests.train.conftest import mqar_config


def _save(run_dir, step, cfg, keep=3):
    main = {"model": {"w": torch.full((3,), float(step))}, "optimizer": {"state": {}},
            "train_state": {"step": step}}
    rank = {"data": {"batches": step}, "rng": ckpt.rng_state()}
    return ckpt.save_checkpoint(run_dir, step, main, rank, cfg, ParallelDims(), keep)


def test_failure_mid_write_keeps_previous(tmp_path, monkeypatch):
    cfg = mqar_config(tmp_path)
    run_dir = tmp_path / "run"
    first = _save(run_dir, 1, cfg)
    real_write = ckpt._write
    calls = []

    def failing_write(path, obj):
        calls.append(path.name)
        if len(calls) == 2:
            # a partial file on disk, then the "crash"
            path.write_bytes(b"partial")
            raise OSError("disk full (injected)")
        real_write(path, obj)

    monkeypatch.setattr(ckpt, "_write", failing_write)
    with pytest.raises(OSError, match="injected"):
        _save(run_dir, 2, cfg)
    monkeypatch.setattr(ckpt, "_write", real_write)
    assert (run_dir / "latest").read_text().strip() == "checkpoints/step_0000001"
    assert ckpt.latest_checkpoint(run_dir) == first
    assert not (run_dir / "checkpoints" / "step_0000002").exists()
    assert torch.equal(ckpt.load_main(first, "model")["w"], torch.full((3,), 1.0))
    assert ckpt.load_rank(first, 0)["data"] == {"batches": 1}
    # the next save clears the leftover temp dir and commits
    second = _save(run_dir, 2, cfg)
    assert ckpt.latest_checkpoint(run_dir) == second
    assert not list((run_dir / "checkpoints").glob(".tmp_*"))


def test_keep_last_k_and_resume_paths(tmp_path):
    cfg = mqar_config(tmp_path, "checkpoint.resume=none")
    run_dir = tmp_path / "run"
    for step in range(1, 5):
        _save(run_dir, step, cfg, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(run_dir)] == ["step_0000003", "step_0000004"]
    assert ckpt.resolve_checkpoint(run_dir).name == "step_0000004"
    assert ckpt.resolve_checkpoint(run_dir / "checkpoints" / "step_0000003").name == "step_0000003"
    assert ckpt.resume_candidates(cfg) == []
    with pytest.raises(CheckpointError, match="nowhere does not exist"):
        ckpt.resolve_checkpoint(tmp_path / "nowhere")


def test_rng_state_roundtrip():
    state = ckpt.rng_state()
    expected = (torch.rand(4), np.random.rand(), random.random())
    ckpt.set_rng_state(state)
    assert torch.equal(torch.rand(4), expected[0])
    assert (np.random.rand(), random.random()) == expected[1:]


def test_preemption_handler_sets_flag_and_restores():
    before = signal.getsignal(signal.SIGTERM)
    with ckpt.PreemptionHandler() as handler:
        assert not handler.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert handler.requested and handler.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before
