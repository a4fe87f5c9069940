"""The multi-process launch a user runs, end to end on CPU: a SlimPajama-layout corpus from
scripts/make_corpus.py, `torchrun --nproc_per_node=2 -m mom_train train` on it (gloo), then `mom-train plot`.
The same commands, on GPUs and configs/mom_340m.yaml, are the README's multi-GPU corpus run."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.ranks import free_port
from tests.train.cli import env, run
from tests.train.conftest import ROOT

STEPS = 30


def make_corpus(root: Path, seed: int = 0) -> Path:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_corpus.py"), str(root), "--train-docs", "400",
                    "--valid-docs", "50", "--docs-per-file", "100", "--files-per-chunk", "2", "--mean-words", "150",
                    "--seed", str(seed)], check=True, capture_output=True, env=env(), timeout=120)
    return root


def corpus_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.jsonl.zst"))}


def test_make_corpus_writes_the_slimpajama_layout_deterministically(tmp_path):
    first = corpus_files(make_corpus(tmp_path / "a"))
    assert sorted(first) == ["train/chunk1/example_train_0.jsonl.zst", "train/chunk1/example_train_1.jsonl.zst",
                             "train/chunk2/example_train_2.jsonl.zst", "train/chunk2/example_train_3.jsonl.zst",
                             "validation/chunk1/example_holdout_0.jsonl.zst"]
    assert corpus_files(make_corpus(tmp_path / "b")) == first
    assert corpus_files(make_corpus(tmp_path / "c", seed=1)) != first

    import zstandard

    lines = zstandard.ZstdDecompressor().decompress(first["train/chunk1/example_train_0.jsonl.zst"],
                                                    max_output_size=1 << 26).decode().splitlines()
    assert len(lines) == 100
    record = json.loads(lines[0])
    assert record["text"].endswith(".") and record["meta"]["redpajama_set_name"].startswith("RedPajama")


def test_torchrun_two_ranks_on_a_generated_corpus_trains_checkpoints_and_plots(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    runs = tmp_path / "runs"
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(free_port()),
         "-m", "mom_train", "train", "--config", str(ROOT / "configs" / "tiny_text.yaml"), f"data.path={corpus}",
         f"run.dir={runs}", f"training.steps={STEPS}", "checkpoint.interval=15", "eval.interval=15"],
        env=env(), capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run_dir = runs / "tiny_text"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    # one writer (rank 0), every step once; tokens seen so far count both ranks' micro-batches of 2 x 64
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert [r["tokens"] for r in train] == [step * 2 * 2 * 64 for step in range(1, STEPS + 1)]
    evals = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
    assert sorted(evals) == [15, STEPS]
    # the held-out loss falls as the model learns the grammar, from about ln(32000) = 10.4 at the start
    assert train[0]["loss"] > 10.0 and evals[STEPS] < evals[15] < train[0]["loss"], (train[0]["loss"], evals)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_0000015", "step_0000030"]
    assert (run_dir / "config.yaml").read_text().count(str(corpus)) == 1

    plotted = run("plot", str(run_dir))
    assert plotted.returncode == 0, plotted.stderr
    for name in ("loss.png", "lr.png", "throughput.png"):
        assert (run_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
