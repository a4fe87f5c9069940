"""The CLI's error boundary on bad input and unusable paths: exit code, no traceback, a message naming the cause
and the fix (in-process `main`, which is the boundary a subprocess would run), and nothing written on refusal."""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

import mom_train.train as train_mod
from mom_train import __version__
from mom_train.cli import main
from mom_train.metrics import plot_run, read_metrics
from tests.train.cli import assert_clean_failure, mqar_args
from tests.train.conftest import ROOT, mqar_config, write_slimpajama


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished 2-step tiny MQAR run (one checkpoint, one evaluation)."""
    root = tmp_path_factory.mktemp("runs")
    train_mod.train(mqar_config(root, "training.steps=2", "training.warmup_steps=1", "eval.interval=2",
                                "eval.num_batches=1"))
    return root / "quickstart"


def _fails(capsys, argv: list[str], code: int, *phrases: str) -> str:
    rc = main(argv)
    return assert_clean_failure((rc, capsys.readouterr().err), code, *phrases)


@pytest.mark.parametrize("args, phrases", [
    (["--prompt", ""], ["the prompt is empty", "token ids"]),
    (["--prompt", "   "], ["the prompt is empty"]),
    (["--prompt", "1 5 70", "--max-new-tokens", "-3"], ["--max-new-tokens -3", ">= 0"]),
    (["--prompt", "1 5 999"], ["token id 999 is out of range", "0..129"]),
    (["--prompt", "the cat"], ["'the' is not one", "space-separated token ids"]),
    (["--prompt", "1 5", "--top-p", "0"], ["--top-p 0"]),
], ids=["empty", "blank", "negative-count", "id-out-of-range", "words", "top-p"])
def test_generate_rejects_bad_input(trained, capsys, args, phrases):
    _fails(capsys, ["generate", "--checkpoint", str(trained), *args], 2, *phrases)


def test_eval_and_generate_without_a_checkpoint(tmp_path, capsys):
    (tmp_path / "empty_run").mkdir()
    _fails(capsys, ["eval", "--checkpoint", str(tmp_path / "empty_run")], 2, "has no checkpoint yet", "train first")
    _fails(capsys, ["generate", "--checkpoint", str(tmp_path / "nowhere"), "--prompt", "1"], 2, "does not exist")


def test_eval_skips_a_damaged_latest_checkpoint(trained, tmp_path, capsys):
    run_dir = tmp_path / "copy"
    (run_dir / "checkpoints").mkdir(parents=True)
    good = trained / "checkpoints" / "step_0000002"
    os.symlink(good, run_dir / "checkpoints" / good.name, target_is_directory=True)
    # a later step whose files are garbage
    bad = run_dir / "checkpoints" / "step_0000003"
    bad.mkdir()
    for f in good.iterdir():
        (bad / f.name).write_bytes(b"garbage")
    assert main(["eval", "--checkpoint", str(run_dir), "eval.num_batches=1"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["step"] == 2
    assert "skipped checkpoint" in out.err and "step_0000003" in out.err and "Traceback" not in out.err


def test_refused_resume_leaves_the_run_untouched(trained, capsys):
    before = {p: p.read_bytes() for p in (trained / "config.yaml", trained / "metrics.jsonl")}
    _fails(capsys, mqar_args(trained.parent, "training.steps=4", "model.hidden_size=64"), 2,
           "model config changed", "model.hidden_size: 32 in the checkpoint, 64 now", "checkpoint.resume=none")
    assert {p: p.read_bytes() for p in before} == before


def test_finished_run_says_so(trained, capsys):
    assert main(mqar_args(trained.parent, "training.steps=2", "training.warmup_steps=1", "eval.interval=2",
                          "eval.num_batches=1")) == 0
    assert "already finished: step 2 of training.steps = 2; raise training.steps" in capsys.readouterr().out


def test_run_dir_that_is_a_file_or_empty_name(tmp_path, capsys):
    (tmp_path / "quickstart").write_text("not a directory")
    _fails(capsys, mqar_args(tmp_path), 2, "is a file, not a directory", "run.name")
    _fails(capsys, mqar_args(tmp_path, "run.name="), 2, "`run.name` = ''", "run.name=try2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["quickstart"]


@contextlib.contextmanager
def _read_only_dir(path: Path):
    """A directory nobody can write into: a read-only mount when running as root (root ignores file modes)."""
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_read_only_run_dir(tmp_path, capsys):
    with _read_only_dir(tmp_path / "ro") as ro:
        _fails(capsys, mqar_args(ro), 2, "cannot create the run dir", str(ro / "quickstart"),
               "set run.dir to a writable directory")


def test_eval_data_is_checked_at_the_start(tmp_path, capsys):
    data = write_slimpajama(tmp_path / "data")
    # held-out data missing: SlimPajama without validation/
    (data / "validation" / "chunk1" / "example_holdout_0.jsonl.zst").unlink()
    (data / "validation" / "chunk1").rmdir()
    (data / "validation").rmdir()
    argv = ["train", "--config", str(ROOT / "configs" / "tiny_text.yaml"), f"run.dir={tmp_path / 'runs'}",
            f"data.path={data}", "eval.interval=2"]
    _fails(capsys, argv, 2, "validation/", "data.eval_path", "eval.interval=0")
    # nothing was trained or saved
    assert not (tmp_path / "runs" / "tiny_text" / "checkpoints").exists()
    assert not (tmp_path / "runs" / "tiny_text" / "config.yaml").exists()
    _fails(capsys, ["eval", "--checkpoint", str(tmp_path / "runs" / "tiny_text")], 2, "has no checkpoint")


def test_unreachable_hub_names_data_path(tmp_path, capsys, monkeypatch):
    # a port nothing listens on; without the `datasets` extra the message asks for it or for data.path
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    argv = ["train", "--config", str(ROOT / "configs" / "tiny_text.yaml"), f"run.dir={tmp_path}"]
    has_datasets = importlib.util.find_spec("datasets") is not None
    phrases = ["cannot be reached", "127.0.0.1:9", "set data.path"] if has_datasets else ["pip install datasets"]
    _fails(capsys, argv, 2, "data.path", *phrases)


def test_debug_prints_the_traceback_version_and_dry_run_warning(tmp_path, capsys):
    assert main(["--debug", "eval", "--checkpoint", str(tmp_path)]) == 2
    assert "Traceback" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tmp_path), "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"mom-train {__version__}"
    assert main(mqar_args(tmp_path, "training.cuda_graphs=true", "--dry-run")) == 0
    warned = "training.cuda_graphs` = true needs a CUDA device" in capsys.readouterr().err
    assert warned == (not torch.cuda.is_available())


def test_plot_survives_a_cut_line_and_replayed_steps(trained, tmp_path):
    run_dir = tmp_path / "plotted"
    run_dir.mkdir()
    lines = (trained / "metrics.jsonl").read_text().splitlines()
    replayed = json.loads(lines[0]) | {"loss": 1.25}
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n" + json.dumps(replayed) + "\n" + lines[0][:20])
    records = read_metrics(run_dir)
    assert [r["loss"] for r in records if r["step"] == replayed["step"] and "loss" in r] == [1.25]
    assert len(records) == len(lines)
    names = [p.name for p in plot_run(run_dir)]
    assert names == ["loss.png", "lr.png", "throughput.png", "recall.png"]
