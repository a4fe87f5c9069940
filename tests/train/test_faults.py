"""Faults as a user meets them, through `mom-train` in a subprocess: a damaged latest checkpoint, two trainings
on one run dir, kill -9, a full disk, the data vanishing mid-run. Each ends without a traceback, with the
stated exit code and a message naming the cause, and the last good state resumes bit-identically."""
from __future__ import annotations

import json
import resource
import shutil
import signal
import subprocess
from pathlib import Path

import mom_train.train as train_mod
from mom_train.checkpoint import latest_checkpoint, list_checkpoints
from mom_train.metrics import plot_run
from tests.train.cli import CONSTANT_LR, assert_clean_failure, mqar_args, run, start, wait_for
from tests.train.conftest import mqar_config, read_losses, text_config, write_slimpajama


def _straight(run_dir: Path, steps: int) -> dict[int, float]:
    """Losses of an uninterrupted tiny MQAR run (constant lr, so any run length shares the schedule)."""
    out = train_mod.train(mqar_config(run_dir, *CONSTANT_LR, f"training.steps={steps}"))
    assert out["step"] == steps
    return read_losses(run_dir / "quickstart")


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _num_logged(run_dir: Path) -> int:
    """Whole lines in a running training's metrics.jsonl (0 before it exists)."""
    path = run_dir / "metrics.jsonl"
    return path.read_bytes().count(b"\n") if path.is_file() else 0


def _assert_resumed_run(run_dir: Path, straight: dict[int, float]) -> None:
    """Every step logged exactly once, each loss equal to the uninterrupted run's."""
    steps = [r["step"] for r in _records(run_dir) if "loss" in r]
    assert steps == sorted(straight), steps
    assert read_losses(run_dir) == straight


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    straight = _straight(tmp_path / "straight", 6)
    run_dir = tmp_path / "runs" / "quickstart"
    train_mod.train(mqar_config(tmp_path / "runs", *CONSTANT_LR, "training.steps=4", "checkpoint.interval=2"))
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_0000002", "step_0000004"]
    # the newest checkpoint's model cut in half, and an empty `latest` pointer
    model = run_dir / "checkpoints" / "step_0000004" / "model.pt"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    (run_dir / "latest").write_text("")

    out = run(*mqar_args(tmp_path / "runs", "training.steps=6", "checkpoint.interval=2"))
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert "skipped checkpoint" in out.stdout and "step_0000004/model.pt is unreadable" in out.stdout, out.stdout
    assert "at step 2" in out.stdout
    # metrics.jsonl: steps 3 and 4 of the first attempt were dropped and logged again
    _assert_resumed_run(run_dir, straight)
    assert latest_checkpoint(run_dir).name == "step_0000006"


def test_second_training_is_refused_and_a_killed_ones_lock_is_taken_over(tmp_path):
    run_dir = tmp_path / "quickstart"
    first = start(*mqar_args(tmp_path, "training.steps=100000", "checkpoint.interval=2"), stdout=subprocess.DEVNULL)
    try:
        wait_for(lambda: latest_checkpoint(run_dir) is not None and _num_logged(run_dir) >= 3)
        second = run(*mqar_args(tmp_path, "training.steps=8"))
        assert_clean_failure(second, 2, "in use by another training", f"pid {first.pid}", "run.name")
    finally:
        # kill -9: no clean-up at all (lock file left, steps after the last checkpoint logged)
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert (run_dir / ".lock").read_text().startswith(f"pid {first.pid} ")
    resumed_from = latest_checkpoint(run_dir).name
    steps = int(resumed_from.split("_")[1]) + 2
    third = run(*mqar_args(tmp_path, f"training.steps={steps}"))
    assert third.returncode == 0 and "Traceback" not in third.stderr, third.stderr
    assert f"took over the lock of a training that is no longer running (pid {first.pid}" in third.stdout
    assert f"resumed from {run_dir / 'checkpoints' / resumed_from}" in third.stdout
    assert not (run_dir / ".lock").exists()
    _assert_resumed_run(run_dir, _straight(tmp_path / "straight", steps))


def _file_size_limit(limit: int):
    def apply() -> None:
        # a write past the limit fails (EFBIG) instead of killing the process
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path):
    run_dir = tmp_path / "quickstart"
    train_mod.train(mqar_config(tmp_path, *CONSTANT_LR, "training.steps=2", "checkpoint.interval=2"))
    # room for the metrics and config (a few KB), not for the next checkpoint's model (tens of KB)
    model_size = (latest_checkpoint(run_dir) / "model.pt").stat().st_size
    limit = model_size // 2
    assert limit > 16 * 1024
    out = run(*mqar_args(tmp_path, "training.steps=6", "checkpoint.interval=2"), preexec_fn=_file_size_limit(limit))
    message = assert_clean_failure(out, 3, "writing checkpoint step 4 failed", "model.pt",
                                   "last good checkpoint is", "step_0000002", "rerun the same command")
    assert "cut short" in message or "file size limit" in message
    assert "inline_container" not in message.split("(")[0]
    assert latest_checkpoint(run_dir).name == "step_0000002"
    assert not list((run_dir / "checkpoints").glob(".tmp_*"))
    # a record cut mid-line, as a crash during a write leaves it
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 4.8')
    # with room again, the run resumes from step 2 as if nothing happened
    out = run(*mqar_args(tmp_path, "training.steps=6", "checkpoint.interval=2"))
    assert out.returncode == 0, out.stderr
    assert "dropped 1 cut or unreadable line(s) and 2 record(s) of steps after 2" in out.stdout, out.stdout
    _assert_resumed_run(run_dir, _straight(tmp_path / "straight", 6))
    plot_run(run_dir)


def test_training_data_vanishing_mid_run_saves_the_last_good_state(tmp_path):
    data = tmp_path / "data"
    write_slimpajama(data)
    args = ["train", "--config", str(Path(__file__).resolve().parents[2] / "configs" / "tiny_text.yaml"),
            f"run.dir={tmp_path}", f"data.path={data}", "checkpoint.interval=0", *CONSTANT_LR]
    run_dir = tmp_path / "tiny_text"
    job = start(*args, "training.steps=100000")
    wait_for(lambda: _num_logged(run_dir) >= 2)
    shutil.rmtree(data)
    stdout, stderr = job.communicate(timeout=120)
    message = assert_clean_failure((job.returncode, stderr), 3, "reading the training data failed",
                                   "no such file or directory", "saved the last good state as checkpoint step")
    saved = latest_checkpoint(run_dir)
    step = int(saved.name.split("_")[1])
    assert f"checkpoint step {step} " in message and step >= 2
    # the data back: the run resumes from the saved state as if it had never stopped
    write_slimpajama(data)
    out = run(*args, f"training.steps={step + 3}")
    assert out.returncode == 0, out.stderr
    straight = train_mod.train(text_config(tmp_path / "straight", data, *CONSTANT_LR, f"training.steps={step + 3}"))
    assert straight["step"] == step + 3
    assert read_losses(run_dir) == read_losses(tmp_path / "straight" / "tiny_text")
