import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import zstandard

from mom_train.config import ConfigError, load_config
from mom_train.data import build_loader, load_tokenizer
from mom_train.data.packing import IGNORE_INDEX
from tests.data.fixtures import SETS, doc_ids, doc_text, write_slimpajama, write_zst_jsonl

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny_text.yaml"
TOK = load_tokenizer("mistral-v1")


def _cfg(path, *extra):
    return load_config(TINY, [f"data.path={path}", *extra])


def _stream(loader) -> tuple[torch.Tensor, list]:
    """All target tokens of a finite loader, concatenated (padding dropped), and the batches."""
    batches = list(loader)
    ids = torch.cat([b.input_ids[0][b.labels[0] != IGNORE_INDEX] for b in batches])
    return ids, batches


def _split_docs(ids: torch.Tensor) -> list[list[int]]:
    """Documents of a token stream: a new one at every BOS."""
    docs: list[list[int]] = []
    for t in ids.tolist():
        if t == TOK.bos_id:
            docs.append([])
        docs[-1].append(t)
    return docs


def _ids_of(docs: list[list[int]]) -> list[int]:
    out = []
    for d in docs:
        found = doc_ids(TOK.decode(d))
        assert len(found) == 1, TOK.decode(d)
        out += found
    return out


def test_tokens_bos_and_cu_seqlens_match_documents(tmp_path):
    write_slimpajama(tmp_path, num_docs=30)
    cfg = _cfg(tmp_path, "data.shuffle_buffer=0", "data.prefetch=0")
    ids, batches = _stream(build_loader(cfg, max_epochs=1))
    docs = _split_docs(ids)
    # every document is [BOS] + raw sentencepiece ids of its text
    texts = {}
    for f in sorted((tmp_path / "train").rglob("*.jsonl.zst")):
        for line in zstandard.ZstdDecompressor().decompress(f.read_bytes(), max_output_size=1 << 24).splitlines():
            text = json.loads(line)["text"]
            texts[doc_ids(text)[0]] = text
    assert sorted(_ids_of(docs)) == list(range(30))
    for d in docs:
        assert d == [1] + TOK.sp.encode(texts[doc_ids(TOK.decode(d))[0]])
    # segments start exactly at the batch start, at every BOS, and at the final padding
    for b in batches:
        x, cu = b.input_ids[0], b.cu_seqlens
        assert x.shape == (128,) and cu[0] == 0 and cu[-1] == 128 and (cu[1:] > cu[:-1]).all()
        starts = {0} | set((x == 1).nonzero().flatten().tolist())
        pad = (b.labels[0] == IGNORE_INDEX).nonzero().flatten().tolist()
        if pad:
            starts.add(pad[0])
        assert set(cu[:-1].tolist()) == starts
        assert torch.equal(b.labels[0][: pad[0] if pad else 128], x[: pad[0] if pad else 128])
    assert batches[-1].stats["documents"] == 30 and batches[-1].stats["epoch"] == 1


@pytest.mark.parametrize("dp_size,files_per_chunk", [(2, 1), (3, 2), (2, 3)],
                         ids=["2ranks-2files", "3ranks-4files", "2ranks-6files"])
def test_one_epoch_gives_every_document_to_exactly_one_rank(tmp_path, dp_size, files_per_chunk):
    write_slimpajama(tmp_path, num_docs=37, files_per_chunk=files_per_chunk, max_words=12)
    cfg = _cfg(tmp_path, "data.num_workers=2", "data.shuffle_buffer=8")
    seen = []
    for rank in range(dp_size):
        ids, _ = _stream(build_loader(cfg, dp_rank=rank, dp_size=dp_size, max_epochs=1))
        rank_ids = _ids_of(_split_docs(ids))
        assert rank_ids, f"rank {rank} got no documents"
        seen += rank_ids
    assert sorted(seen) == list(range(37))


def _assert_resumes(cfg, k=9, n=9, **kw):
    loader = build_loader(cfg, **kw)
    for _ in range(k):
        next(loader)
    buf = io.BytesIO()
    torch.save(loader.state_dict(), buf)
    expect = [next(loader) for _ in range(n)]
    loader.close()
    resumed = build_loader(cfg, **kw)
    buf.seek(0)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    for e in expect:
        got = next(resumed)
        assert torch.equal(got.input_ids, e.input_ids) and torch.equal(got.labels, e.labels)
        assert torch.equal(got.cu_seqlens, e.cu_seqlens) and got.stats == e.stats
    resumed.close()
    return expect


def test_resume_is_exact_with_shuffling_workers_and_prefetch(tmp_path):
    write_slimpajama(tmp_path, num_docs=40, max_words=30)
    cfg = _cfg(tmp_path, "data.num_workers=2", "data.shuffle_buffer=16", "data.prefetch=3")
    expect = _assert_resumes(cfg, dp_rank=1, dp_size=2)
    # the resumed span crosses an epoch boundary
    assert expect[0].stats["epoch"] < expect[-1].stats["epoch"]


def test_prefetch_and_threads_do_not_change_the_stream(tmp_path):
    write_slimpajama(tmp_path, num_docs=20)
    runs = []
    for extra in (["data.num_workers=0", "data.prefetch=0"], ["data.num_workers=1", "data.prefetch=4"]):
        loader = build_loader(_cfg(tmp_path, "data.shuffle_buffer=4", *extra))
        runs.append(torch.cat([next(loader).input_ids for _ in range(12)]))
        loader.close()
    assert torch.equal(runs[0], runs[1])
    # and the shuffle buffer does change the document order
    unshuffled = build_loader(_cfg(tmp_path, "data.shuffle_buffer=0"))
    assert not torch.equal(runs[0], torch.cat([next(unshuffled).input_ids for _ in range(12)]))
    unshuffled.close()


def _write_files_source(root: Path) -> None:
    write_zst_jsonl(root / "a.jsonl.zst", [json.dumps({"body": doc_text(i, _rng(i))}).encode() for i in range(6)])
    (root / "b.jsonl").write_text("".join(json.dumps({"body": doc_text(i, _rng(i))}) + "\n" for i in range(6, 12)))
    table = pa.table({"body": [doc_text(i, _rng(i)) for i in range(12, 18)]})
    pq.write_table(table, root / "c.parquet")
    (root / "d.txt").write_text(doc_text(18, _rng(18)))


def _rng(i):
    import random
    return random.Random(i)


def test_files_source_reads_every_format_once_and_resumes(tmp_path):
    _write_files_source(tmp_path)
    cfg = load_config(TINY, ["data.source=files", f"data.path={tmp_path}/*", "data.text_field=body",
                             "data.shuffle_buffer=5", "data.num_workers=2"])
    ids, _ = _stream(build_loader(cfg, max_epochs=1))
    assert sorted(_ids_of(_split_docs(ids))) == list(range(19))
    _assert_resumes(cfg, k=4, n=8)


def test_bad_records_are_skipped_and_counted(tmp_path):
    good = [json.dumps({"text": doc_text(i, _rng(i)), "meta": {}}).encode() for i in range(5)]
    bad = [b'{"text": "unterminated', json.dumps({"meta": {}}).encode(), json.dumps({"text": "  "}).encode(),
           json.dumps({"text": 5}).encode(), b'{"text": "caf\xe9"}', b"[1, 2]"]
    write_zst_jsonl(tmp_path / "train" / "chunk1" / "example_train_0.jsonl.zst", good[:3] + bad + good[3:])
    # a truncated file (several 128 KiB zstd blocks, the complete ones stay readable) and a file that is not zstd
    write_zst_jsonl(tmp_path / "train" / "chunk1" / "example_train_1.jsonl.zst",
                    [json.dumps({"text": doc_text(100 + i, _rng(i))}).encode() for i in range(3000)])
    path = tmp_path / "train" / "chunk1" / "example_train_1.jsonl.zst"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    (tmp_path / "train" / "chunk2").mkdir()
    (tmp_path / "train" / "chunk2" / "example_train_0.jsonl.zst").write_bytes(b"not zstd at all" * 10)
    ids, batches = _stream(build_loader(_cfg(tmp_path, "data.num_workers=2"), max_epochs=1))
    got = _ids_of(_split_docs(ids))
    assert sorted(i for i in got if i < 100) == list(range(5))
    stats = batches[-1].stats
    assert stats["skipped_bad_json"] == 2 and stats["skipped_empty"] == 3 and stats["skipped_bad_utf8"] == 1
    assert stats["truncated_files"] == 2 and stats["skipped_subsampled"] == 0
    assert stats["documents"] == len(got) and 5 < len(got) < 3005


def test_missing_or_empty_paths_fail_fast_with_their_name(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError, match="nowhere"):
        build_loader(_cfg(missing))
    (tmp_path / "train").mkdir()
    with pytest.raises(ConfigError, match="no .*files under .*train"):
        build_loader(_cfg(tmp_path))
    with pytest.raises(ConfigError, match=r"\*.jsonl.*matches no files"):
        build_loader(load_config(TINY, ["data.source=files", f"data.path={tmp_path}/*.jsonl"]))
    with pytest.raises(ConfigError, match="validation"):
        build_loader(_cfg(tmp_path), split="eval")


def test_no_valid_documents_is_a_clear_error(tmp_path):
    write_zst_jsonl(tmp_path / "train" / "chunk1" / "x.jsonl.zst", [b"{bad", b'{"text": ""}'])
    with pytest.raises(ConfigError, match="no valid documents"):
        next(build_loader(_cfg(tmp_path)))


def test_eval_split_reads_validation(tmp_path):
    ids_by_split = write_slimpajama(tmp_path, num_docs=10, num_eval_docs=6)
    ids, _ = _stream(build_loader(_cfg(tmp_path), split="eval", max_epochs=1))
    assert sorted(_ids_of(_split_docs(ids))) == ids_by_split["eval"]


def test_subset_weights_are_deterministic_keep_probabilities(tmp_path):
    write_slimpajama(tmp_path, num_docs=100, max_words=5)
    weights = f"data.subset_weights={{{SETS[0]}: 0.0, {SETS[1]}: 0.5}}"
    runs = []
    for _ in range(2):
        ids, batches = _stream(build_loader(_cfg(tmp_path, weights), max_epochs=1))
        runs.append(sorted(_ids_of(_split_docs(ids))))
    assert runs[0] == runs[1]
    kept = set(runs[0])
    assert not any(i % 5 == 0 for i in kept)
    assert all(i in kept for i in range(100) if i % 5 >= 2)
    half = sum(1 for i in kept if i % 5 == 1)
    assert 3 <= half <= 17
    assert batches[-1].stats["skipped_subsampled"] == 40 - half


def test_resume_refuses_another_topology(tmp_path):
    write_slimpajama(tmp_path, num_docs=10)
    loader = build_loader(_cfg(tmp_path))
    next(loader)
    sd = loader.state_dict()
    loader.close()
    with pytest.raises(ConfigError, match="data-parallel size 1 .* has 2"):
        build_loader(_cfg(tmp_path), dp_rank=0, dp_size=2).load_state_dict(sd)
    with pytest.raises(ConfigError, match="data.num_workers"):
        build_loader(_cfg(tmp_path, "data.num_workers=2")).load_state_dict(sd)


def test_saved_state_names_documents_instead_of_holding_them(tmp_path):
    # a few documents of ~20k tokens each: the shuffle buffer and the packer hold most of them at once
    write_slimpajama(tmp_path, num_docs=6, num_chunks=1, files_per_chunk=2, max_words=8000)
    cfg = _cfg(tmp_path, "data.shuffle_buffer=4", "training.seq_len=256", "training.micro_batch_size=4")
    loader = build_loader(cfg)
    next(loader)
    buffered = sum(doc.numel() for doc, _ in loader._state["buffer"])
    state = io.BytesIO()
    torch.save(loader.state_dict(), state)
    loader.close()
    # a few numbers per document, not its tokens (4 bytes each)
    assert state.tell() < 10_000 < buffered * 4
    # and the stream still resumes exactly, over a cut document too
    _assert_resumes(cfg, k=3, n=4)
