import json
from collections import Counter

import pytest
import zstandard

from mom_train.data import sources
from mom_train.data.sources import RecordReader, Unit, shard_units


@pytest.mark.parametrize("num_files", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("num_shards", [1, 2, 3, 4, 6, 9])
def test_shards_partition_every_record_once(num_files, num_shards):
    files = [f"/d/train/chunk1/f{i}.jsonl.zst" for i in range(num_files)]
    records = 7
    for epoch in range(2):
        owned = Counter()
        for shard in range(num_shards):
            for u in shard_units(files, shard, num_shards, epoch, seed=3):
                owned.update((u.path, i) for i in range(records) if i % u.stride == u.offset)
                # a shard never opens more files than it needs
                assert u.stride == 1 or len(shard_units(files, shard, num_shards, epoch, 3)) == 1
        assert owned == Counter((f, i) for f in files for i in range(records))


def test_file_order_is_reshuffled_per_epoch():
    files = [f"/d/f{i}.jsonl" for i in range(16)]
    orders = [[u.path for u in shard_units(files, 0, 1, epoch, seed=0)] for epoch in range(3)]
    assert sorted(orders[0]) == sorted(files) and orders[0] != orders[1] != orders[2]


def test_multi_frame_zst_reads_across_small_reads(tmp_path, monkeypatch):
    lines = [json.dumps({"text": f"doc {i}"}).encode() for i in range(1000)]
    cctx = zstandard.ZstdCompressor()
    path = tmp_path / "x.jsonl.zst"
    path.write_bytes(b"".join(cctx.compress(b"\n".join(lines[i:i + 300]) + b"\n") for i in range(0, 1000, 300)))
    monkeypatch.setattr(sources, "ZST_READ_SIZE", 37)
    stats = Counter()
    got = [t for t, _ in RecordReader("text", None, 0, stats).read(Unit(str(path), "x", 3, 1), start=10)]
    assert got == [f"doc {i}" for i in range(10, 1000) if i % 3 == 1] and not stats
