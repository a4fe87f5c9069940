"""Fixtures for the trainer tests: tiny MQAR / text configs and a SlimPajama-layout text fixture."""
from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard

from mom_train.config import Config, load_config

ROOT = Path(__file__).resolve().parents[2]

# a MoM small enough that one step takes a few milliseconds on one CPU core
TINY_MQAR = [
    "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.head_dim=16",
    "training.micro_batch_size=4", "training.seq_len=40", "training.steps=6", "training.warmup_steps=2",
    "run.device=cpu", "logging.interval=1", "logging.progress_bar=false", "eval.interval=0",
    "checkpoint.interval=0", "checkpoint.keep=2",
]

WORDS = ("the cat sat on a mat while seven quiet engineers measured memory routing across packed documents "
         "and wrote checkpoints that resume exactly").split()


def mqar_config(run_dir: Path, *overrides: str, world_size: int = 1) -> Config:
    return load_config(ROOT / "configs" / "quickstart.yaml", [f"run.dir={run_dir}", *TINY_MQAR, *overrides],
                       world_size=world_size)


def text_config(run_dir: Path, data_root: Path, *overrides: str) -> Config:
    return load_config(ROOT / "configs" / "tiny_text.yaml",
                       [f"run.dir={run_dir}", f"data.path={data_root}", "training.steps=6", "checkpoint.interval=0",
                        *overrides], world_size=1)


def write_slimpajama(root: Path, num_docs: int = 40, seed: int = 0) -> Path:
    """train/chunk1/example_train_0.jsonl.zst and validation/chunk1/example_holdout_0.jsonl.zst."""
    import random

    rng = random.Random(seed)
    for split, name in (("train", "example_train_0"), ("validation", "example_holdout_0")):
        lines = []
        for _ in range(num_docs):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60)))
            lines.append(json.dumps({"text": text, "meta": {"redpajama_set_name": "RedPajamaC4"}}))
        path = root / split / "chunk1" / f"{name}.jsonl.zst"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(zstandard.ZstdCompressor().compress(("\n".join(lines) + "\n").encode()))
    return root


@pytest.fixture(scope="session")
def slimpajama_root(tmp_path_factory) -> Path:
    return write_slimpajama(tmp_path_factory.mktemp("slimpajama"))


def read_losses(run_dir: Path) -> dict[int, float]:
    """step -> train loss from metrics.jsonl (a resumed run appends; the latest record of a step wins)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record["loss"]
    return out


class SignalAfter:
    """Loader proxy that sends this process SIGTERM once `after` batches were taken (a preemption)."""

    def __init__(self, loader, after: int):
        self.loader, self.after, self.taken = loader, after, 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.loader)
        self.taken += 1
        if self.taken == self.after:
            os.kill(os.getpid(), signal.SIGTERM)
        return batch

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, sd):
        self.loader.load_state_dict(sd)

    def close(self):
        self.loader.close()


def train_ranks(run_dir: Path, world: int, overrides: list[str], preempt_after: int = 0,
                loader: Callable | None = None) -> None:
    """Train `mqar_config(run_dir, *overrides)` on `world` processes (gloo, as torchrun would launch them);
    with preempt_after, rank 0 is signalled once it took that many batches (the ranks must agree to stop).
    loader: a picklable stand-in for the trainer's `build_loader` (same arguments), on every rank."""
    import torch.multiprocessing as mp

    from tests.ranks import free_port

    mp.spawn(_train_rank, args=(world, free_port(), str(run_dir), preempt_after, overrides, loader), nprocs=world,
             join=True)


def _train_rank(rank: int, world: int, port: int, run_dir: str, preempt_after: int, overrides: list[str],
                loader: Callable | None) -> None:
    import torch

    import mom_train.train as train_mod

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if loader is not None:
        train_mod.build_loader = loader
    if preempt_after and rank == 0:
        build = train_mod.build_loader
        train_mod.build_loader = lambda *a, **k: SignalAfter(build(*a, **k), preempt_after)
    out = train_mod.train(mqar_config(Path(run_dir), *overrides, world_size=world))
    assert out["preempted"] == bool(preempt_after)


@pytest.fixture(scope="session")
def reference_runs(tmp_path_factory):
    """Runs that several tests compare against, trained once per session: `reference_runs(world, overrides)` ->
    the run directory (world ranks on gloo, or this process for world 1)."""
    import mom_train.train as train_mod

    cache: dict[tuple, Path] = {}

    def get(world: int, overrides: list[str]) -> Path:
        key = (world, tuple(overrides))
        if key not in cache:
            run_dir = tmp_path_factory.mktemp("reference")
            if world == 1:
                train_mod.train(mqar_config(run_dir, *overrides))
            else:
                train_ranks(run_dir, world, list(overrides))
            cache[key] = run_dir
        return cache[key]
    return get
