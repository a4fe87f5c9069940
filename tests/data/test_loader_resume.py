"""Resume inside a file, for every text source: a shard holds more documents than one read chunk, so a saved
loader state points into the middle of a file (of the shard's file list, for txt), behind a shuffle buffer
and packer leftovers. The batches after a resume must equal those of the uninterrupted stream."""
from __future__ import annotations

import io
import json
import random
import sys
import types
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mom_train.config import load_config
from mom_train.data import build_loader
from mom_train.data.loader import CHUNK_DOCS
from mom_train.data import sources
from mom_train.data.sources import HUB_DATASET
from tests.data.fixtures import doc_text, write_zst_jsonl

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny_text.yaml"
# two workers each read more than two read chunks; no file size is a multiple of a chunk
NUM_DOCS = 4 * CHUNK_DOCS + 44
LOADER = ["data.num_workers=2", "data.shuffle_buffer=16", "data.prefetch=2"]
# batches of the uninterrupted stream (about 1.5 epochs) and the stop points resumed from (one in the second epoch)
NUM_BATCHES = 45
STOPS = (1, 13, 33)


def texts() -> list[str]:
    rng = random.Random(0)
    return [doc_text(i, rng, max_words=8) for i in range(NUM_DOCS)]


def round_robin(items: list[str], num_files: int) -> list[list[str]]:
    return [items[f::num_files] for f in range(num_files)]


def jsonl_lines(docs: list[str]) -> list[bytes]:
    return [json.dumps({"text": d}).encode() for d in docs]


def write_jsonl(root: Path) -> None:
    for f, docs in enumerate(round_robin(texts(), 2)):
        (root / f"part{f}.jsonl").write_bytes(b"".join(line + b"\n" for line in jsonl_lines(docs)))


def write_jsonl_zst(root: Path) -> None:
    # one file for two workers: each reads every other record of it
    write_zst_jsonl(root / "part0.jsonl.zst", jsonl_lines(texts()))


def write_parquet(root: Path) -> None:
    for f, docs in enumerate(round_robin(texts(), 3)):
        pq.write_table(pa.table({"text": docs}), root / f"part{f}.parquet")


def write_txt(root: Path) -> None:
    # one document per file
    for i, doc in enumerate(texts()):
        (root / f"doc{i:04d}.txt").write_text(doc)


def files_config(root: Path, write: Callable[[Path], None]) -> list[str]:
    write(root)
    return ["data.source=files", f"data.path={root}/*"]


def hub_config(root: Path, monkeypatch) -> list[str]:
    """slimpajama without data.path streams from the hub: `datasets` is replaced by an in-memory stream."""
    records = [{"text": doc, "meta": {"redpajama_set_name": "RedPajamaC4"}} for doc in texts()]

    def load_dataset(name: str, split: str, streaming: bool):
        assert (name, split, streaming) == (HUB_DATASET, "train", True)
        return iter(records)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    # the stand-in hub is always reachable (the real check looks up the hub's host)
    monkeypatch.setattr(sources, "hub_unreachable", lambda: None)
    return ["data.source=slimpajama"]


SOURCES = [
    pytest.param(lambda root, mp: files_config(root, write_jsonl), id="jsonl-2files"),
    pytest.param(lambda root, mp: files_config(root, write_jsonl_zst), id="jsonl.zst-1file-strided"),
    pytest.param(lambda root, mp: files_config(root, write_parquet), id="parquet-3files"),
    pytest.param(lambda root, mp: files_config(root, write_txt), id="txt-1doc-per-file"),
    pytest.param(hub_config, id="hub-stream"),
]


def saved(state: dict) -> dict:
    """The state through torch.save / torch.load, as a checkpoint holds it."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def assert_same_batch(got, want, where: str) -> None:
    assert torch.equal(got.input_ids, want.input_ids), f"{where}: input_ids differ"
    assert torch.equal(got.labels, want.labels), f"{where}: labels differ"
    assert torch.equal(got.cu_seqlens, want.cu_seqlens), f"{where}: cu_seqlens differ"
    assert got.stats == want.stats, f"{where}: stats {got.stats} != {want.stats}"


@pytest.mark.parametrize("source", SOURCES)
def test_resume_mid_file_continues_the_stream(tmp_path, monkeypatch, source):
    """Stopped after each of STOPS batches and resumed from the saved state, the loader yields exactly the
    uninterrupted stream's next batches, up to NUM_BATCHES (across an epoch boundary)."""
    cfg = load_config(TINY, [*source(tmp_path, monkeypatch), *LOADER])
    loader = build_loader(cfg)
    stream, states = [], {}
    for i in range(1, NUM_BATCHES + 1):
        stream.append(next(loader))
        if i in STOPS:
            states[i] = saved(loader.state_dict())
    loader.close()
    assert stream[0].stats["epoch"] == 0 and stream[-1].stats["epoch"] >= 1
    for stop, state in states.items():
        # a worker's cursor (epoch, unit, record) points past the start of a unit: the resume is mid-file
        assert any(record > 0 for _, _, record in state["cursors"]), (stop, state["cursors"])
        resumed = build_loader(cfg)
        resumed.load_state_dict(state)
        for i in range(stop, NUM_BATCHES):
            assert_same_batch(next(resumed), stream[i], f"resumed after batch {stop}, batch {i + 1}")
        resumed.close()
