"""Bitwise resume on CPU: N steps straight == the same run preempted by SIGTERM midway and resumed (auto)."""
from __future__ import annotations

from pathlib import Path

import pytest

import mom_train.train as train_mod
from mom_train.checkpoint import latest_checkpoint
from mom_train.config import ConfigError
from tests.train.conftest import SignalAfter, mqar_config, read_losses, text_config, train_ranks


def _preempt_after(monkeypatch, batches: int) -> None:
    build = train_mod.build_loader
    monkeypatch.setattr(train_mod, "build_loader", lambda *a, **k: SignalAfter(build(*a, **k), batches))


def _assert_same_losses(straight: dict[int, float], resumed: dict[int, float], steps: int) -> None:
    assert sorted(straight) == list(range(1, steps + 1))
    assert sorted(resumed) == list(range(1, steps + 1))
    for step in straight:
        assert straight[step] == resumed[step], f"step {step}: {straight[step]!r} != {resumed[step]!r}"


def test_resume_bitwise_mqar(tmp_path, monkeypatch):
    steps = 6
    train_mod.train(mqar_config(tmp_path / "a", "run.name=straight"))
    with monkeypatch.context() as m:
        _preempt_after(m, 3)
        out = train_mod.train(mqar_config(tmp_path / "b", "run.name=resumed"))
    assert out["preempted"] and out["step"] == 3
    assert latest_checkpoint(tmp_path / "b" / "resumed").name == "step_0000003"
    out = train_mod.train(mqar_config(tmp_path / "b", "run.name=resumed", "checkpoint.resume=auto"))
    assert out["step"] == steps and not out["preempted"]
    _assert_same_losses(read_losses(tmp_path / "a" / "straight"), read_losses(tmp_path / "b" / "resumed"), steps)


def test_resume_bitwise_text(tmp_path, monkeypatch, slimpajama_root):
    steps = 6
    # micro-batch 2, grad accumulation 2
    accum = "training.global_batch_size=4"
    train_mod.train(text_config(tmp_path / "a", slimpajama_root, accum))
    with monkeypatch.context() as m:
        # signalled while fetching step 2's micro-batches: step 2 still completes
        _preempt_after(m, 3)
        out = train_mod.train(text_config(tmp_path / "b", slimpajama_root, accum))
    assert out["preempted"] and out["step"] == 2
    train_mod.train(text_config(tmp_path / "b", slimpajama_root, accum))
    _assert_same_losses(read_losses(tmp_path / "a" / "tiny_text"), read_losses(tmp_path / "b" / "tiny_text"), steps)


def test_resume_refuses_changed_model(tmp_path):
    train_mod.train(mqar_config(tmp_path, "training.steps=1", "training.warmup_steps=1"))
    with pytest.raises(ConfigError, match=r"model\.hidden_size: 32 in the checkpoint, 64 now"):
        train_mod.train(mqar_config(tmp_path, "training.steps=2", "model.hidden_size=64"))


def _spawn(run_dir: Path, preempt_after: int = 0, *overrides: str) -> None:
    # 2 ranks x micro-batch 4 x grad accumulation 2
    train_ranks(run_dir, 2, ["training.global_batch_size=16", *overrides], preempt_after)


def test_resume_bitwise_two_ranks_gloo(tmp_path):
    steps = 6
    _spawn(tmp_path / "a")
    _spawn(tmp_path / "b", 4)
    # grad accumulation 2 per rank: 4 batches = 2 steps
    assert latest_checkpoint(tmp_path / "b" / "quickstart").name == "step_0000002"
    assert len(list(latest_checkpoint(tmp_path / "b" / "quickstart").glob("rank_*.pt"))) == 2
    _spawn(tmp_path / "b")
    _assert_same_losses(read_losses(tmp_path / "a" / "quickstart"), read_losses(tmp_path / "b" / "quickstart"),
                        steps)
    with pytest.raises(ConfigError, match="written by 2 data-parallel rank"):
        train_mod.train(mqar_config(tmp_path / "b", "training.steps=8"))
