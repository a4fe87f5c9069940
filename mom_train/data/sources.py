"""Text sources: file discovery, rank x worker sharding, and record readers that skip and count bad data.

Sources (`data.source`):
  slimpajama  local mirror in the dataset's layout, `<data.path>/train/chunkN/example_train_M.jsonl.zst` with
              records {"text": ..., "meta": {"redpajama_set_name": ...}}; split "eval" reads
              `<data.path>/validation/` (or every jsonl(.zst) under `data.eval_path`). With data.path None it
              streams cerebras/SlimPajama-627B from the hub through `datasets` (imported lazily).
  files       jsonl, jsonl.zst, parquet or txt files matching the glob (or under the directory) `data.path`;
              split "eval" uses `data.eval_path`. The text is record[data.text_field]; a .txt file is one document.

Sharding: the stream of a data-parallel rank is split over its workers, giving S = dp_size * workers shards.
Every epoch the file list is permuted (seeded by run seed and epoch, the same on every rank). With at least S
files, shard s reads whole files s, s+S, ...; with fewer, the shards sharing file f = s % F read its records
strided (record i belongs to the (i % k)-th of the k sharers) and never open the other files. Each document
therefore goes to exactly one shard per epoch.

Subset weights (`data.subset_weights`, slimpajama): a document of set `meta.redpajama_set_name` is kept with
probability weight (missing sets: 1.0), decided by a hash of (run seed, file, record index), so the same
documents are kept on every run and resume, independent of sharding.

Bad data is skipped and counted in `stats` (a Counter): skipped_bad_json, skipped_empty (missing, non-string
or blank text), skipped_bad_utf8, truncated_files (a .zst that ends early or is corrupt), skipped_bad_files
(an unreadable parquet/txt file), skipped_subsampled.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import socket
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mom_train.config import ConfigError, DataConfig
from mom_train.errors import DataError

# counters every text Batch.stats carries (cumulative; "documents"/"tokens" count what was read and tokenized)
STAT_KEYS = ("documents", "tokens", "skipped_bad_json", "skipped_empty", "skipped_bad_utf8", "truncated_files",
             "skipped_bad_files", "skipped_subsampled")
SUFFIXES = (".jsonl", ".jsonl.zst", ".parquet", ".txt")
JSONL_SUFFIXES = (".jsonl", ".jsonl.zst")
HUB_DATASET = "cerebras/SlimPajama-627B"
HUB = "hub"
ZST_READ_SIZE = 1 << 20


@dataclass(frozen=True)
class Unit:
    """Part of one shard's epoch: the records of `path` with index % stride == offset; `key` names the file
    stably (relative path) for subset hashing."""
    path: str
    key: str
    stride: int = 1
    offset: int = 0


def _has_suffix(path: str, suffixes: tuple[str, ...]) -> bool:
    return any(path.endswith(s) for s in suffixes)


def _files_under(root: Path, suffixes: tuple[str, ...]) -> list[str]:
    return sorted(str(p) for p in root.rglob("*") if p.is_file() and _has_suffix(p.name, suffixes))


def resolve_files(cfg: DataConfig, split: str) -> list[str] | None:
    """Sorted list of the files of `split` ("train" or "eval"); None means stream from the hub."""
    if split not in ("train", "eval"):
        raise ConfigError(f"data split must be 'train' or 'eval', got {split!r}")
    if cfg.source == "slimpajama":
        if split == "eval" and cfg.eval_path:
            return _require(cfg.eval_path, "data.eval_path", JSONL_SUFFIXES, sub=None)
        if cfg.path is None:
            return None
        sub = "train" if split == "train" else "validation"
        return _require(cfg.path, "data.path", JSONL_SUFFIXES, sub=sub)
    if cfg.source == "files":
        if split == "eval":
            if not cfg.eval_path:
                raise ConfigError("split 'eval' with `data.source` = 'files' needs `data.eval_path` (a glob or "
                                  "directory of held-out files); set it or disable evaluation with eval.interval=0")
            return _require(cfg.eval_path, "data.eval_path", SUFFIXES, sub=None)
        if not cfg.path:
            raise ConfigError("`data.source` = 'files' needs `data.path` (a glob of jsonl/jsonl.zst/parquet/txt files)")
        return _require(cfg.path, "data.path", SUFFIXES, sub=None)
    raise ConfigError(f"`data.source` = {cfg.source!r} is not a text source")


def _require(pattern: str, name: str, suffixes: tuple[str, ...], sub: str | None) -> list[str]:
    """Files of a directory (optionally its `sub` folder) or a glob; ConfigError naming the path if none."""
    path = Path(pattern).expanduser()
    if path.is_dir():
        root = path / sub if sub else path
        if not root.is_dir():
            fix = ("; for evaluation set data.eval_path to held-out files, or eval.interval=0 to train without "
                   "evaluating") if sub == "validation" else ""
            raise ConfigError(f"`{name}` = {pattern!r} has no `{sub}/` folder ({root} is missing); expected the "
                              f"SlimPajama layout {sub}/chunkN/*.jsonl.zst{fix}")
        files = _files_under(root, suffixes)
        if not files:
            raise ConfigError(f"no {'/'.join(suffixes)} files under {root} (from `{name}` = {pattern!r})")
        return files
    matches = sorted(p for p in glob.glob(str(path), recursive=True) if os.path.isfile(p))
    files = [p for p in matches if _has_suffix(p, suffixes)]
    if not files:
        what = "does not exist" if not glob.has_magic(str(path)) else "matches no files"
        extra = f" (it matched {len(matches)} files of other types)" if matches else ""
        raise ConfigError(f"`{name}` = {pattern!r} {what}{extra}; expected a directory or glob of "
                          f"{', '.join(suffixes)} files")
    return files


def shard_units(files: list[str] | None, shard: int, num_shards: int, epoch: int, seed: int) -> list[Unit]:
    """The units `shard` of `num_shards` reads in `epoch` (see the module docstring); hub: one strided unit."""
    if files is None:
        return [Unit(HUB, HUB, num_shards, shard)]
    root = os.path.commonpath(files) if len(files) > 1 else os.path.dirname(files[0])
    order = [files[i] for i in np.random.default_rng([seed, epoch]).permutation(len(files))]
    if len(order) >= num_shards:
        return [Unit(p, os.path.relpath(p, root)) for p in order[shard::num_shards]]
    num_files = len(order)
    f = shard % num_files
    sharers = len(range(f, num_shards, num_files))
    return [Unit(order[f], os.path.relpath(order[f], root), sharers, shard // num_files)]


def hub_unreachable(timeout_s: float = 5.0) -> str | None:
    """None when the hub (HF_ENDPOINT, by default huggingface.co) accepts a connection, else why not; checked
    before `datasets` retries for half a minute."""
    endpoint = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as e:
        return f"{host}:{port}: {e.strerror or e}"
    return None


def keep_probability_hash(seed: int, key: str, index: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, file key, record index)."""
    digest = hashlib.blake2b(f"{seed}:{key}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0 ** 64


class RecordReader:
    """Reads the owned records of units; yields (text | None, next_record_index) for every owned record
    (None when skipped, so a cursor can move past bad records) and counts skips in `stats`."""

    def __init__(self, text_field: str, subset_weights: dict[str, float] | None, seed: int, stats: Counter,
                 hub_split: str = "train"):
        self.text_field = text_field
        self.subset_weights = subset_weights
        self.seed = seed
        self.stats = stats
        self.hub_split = hub_split

    def read(self, unit: Unit, start: int) -> Iterator[tuple[str | None, int]]:
        if unit.path == HUB:
            yield from self._read_hub(unit, start)
        elif _has_suffix(unit.path, JSONL_SUFFIXES):
            for index, line in enumerate(self._lines(unit.path)):
                if index < start or index % unit.stride != unit.offset:
                    continue
                yield self._parse_line(line, unit, index), index + 1
        elif unit.path.endswith(".parquet"):
            yield from self._read_parquet(unit, start)
        else:
            yield from self._read_txt(unit, start)

    def _lines(self, path: str) -> Iterator[bytes]:
        if not path.endswith(".zst"):
            with open(path, "rb") as f:
                yield from f
            return
        import zstandard

        tail = b""
        with open(path, "rb") as f:
            dobj = zstandard.ZstdDecompressor().decompressobj()
            ended = False
            try:
                while chunk := f.read(ZST_READ_SIZE):
                    data = b""
                    while chunk:
                        # a multi-frame file: each frame needs a fresh decompressor
                        if dobj.eof:
                            dobj = zstandard.ZstdDecompressor().decompressobj()
                        data += dobj.decompress(chunk)
                        chunk = dobj.unused_data if dobj.eof else b""
                    lines = (tail + data).split(b"\n")
                    tail = lines.pop()
                    yield from lines
                ended = dobj.eof
            except zstandard.ZstdError:
                ended = False
        if not ended:
            # the partial last line of a truncated file is dropped with the file's remainder
            self.stats["truncated_files"] += 1
        elif tail:
            yield tail

    def _parse_line(self, line: bytes, unit: Unit, index: int) -> str | None:
        if not line.strip():
            self.stats["skipped_empty"] += 1
            return None
        try:
            decoded = line.decode("utf-8")
        except UnicodeDecodeError:
            self.stats["skipped_bad_utf8"] += 1
            return None
        try:
            record = json.loads(decoded)
        except json.JSONDecodeError:
            self.stats["skipped_bad_json"] += 1
            return None
        if not isinstance(record, dict):
            self.stats["skipped_bad_json"] += 1
            return None
        return self._accept(record.get(self.text_field), record.get("meta"), unit, index)

    def _accept(self, text: object, meta: object, unit: Unit, index: int) -> str | None:
        if not isinstance(text, str) or not text.strip():
            self.stats["skipped_empty"] += 1
            return None
        if self.subset_weights:
            name = meta.get("redpajama_set_name") if isinstance(meta, dict) else None
            weight = self.subset_weights.get(name, 1.0)
            if weight < 1.0 and keep_probability_hash(self.seed, unit.key, index) >= weight:
                self.stats["skipped_subsampled"] += 1
                return None
        return text

    def _read_parquet(self, unit: Unit, start: int) -> Iterator[tuple[str | None, int]]:
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(unit.path)
        except Exception:  # noqa: BLE001 - any unreadable file is counted, not fatal
            self.stats["skipped_bad_files"] += 1
            return
        if self.text_field not in pf.schema_arrow.names:
            raise ConfigError(f"parquet file {unit.path} has no column `{self.text_field}` (columns: "
                              f"{', '.join(pf.schema_arrow.names)}); set data.text_field")
        index = 0
        for batch in pf.iter_batches(columns=[self.text_field], batch_size=1024):
            texts = batch.column(0).to_pylist()
            for text in texts:
                if index >= start and index % unit.stride == unit.offset:
                    yield self._accept(text, None, unit, index), index + 1
                index += 1

    def _read_txt(self, unit: Unit, start: int) -> Iterator[tuple[str | None, int]]:
        if start > 0 or unit.offset != 0:
            return
        try:
            data = Path(unit.path).read_bytes()
        except OSError:
            self.stats["skipped_bad_files"] += 1
            return
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            self.stats["skipped_bad_utf8"] += 1
            yield None, 1
            return
        yield self._accept(text, None, unit, 0), 1

    def _read_hub(self, unit: Unit, start: int) -> Iterator[tuple[str | None, int]]:
        try:
            import datasets
        except ImportError:
            raise ConfigError("`data.source` = 'slimpajama' with `data.path` unset streams from the hub and needs "
                              "`datasets` (pip install datasets), or set data.path to a local mirror") from None
        unreachable = hub_unreachable()
        if unreachable:
            raise DataError(f"`data.source` = 'slimpajama' without `data.path` streams {HUB_DATASET} from the "
                            f"Hugging Face hub, which cannot be reached ({unreachable}); without network access "
                            "set data.path to a local mirror (train/chunkN/*.jsonl.zst)")
        split = "train" if self.hub_split == "train" else "validation"
        stream = datasets.load_dataset(HUB_DATASET, split=split, streaming=True)
        # every shard reads the stream and keeps its strided records (the hub has no cheaper random access)
        for index, record in enumerate(stream):
            if index < start or index % unit.stride != unit.offset:
                continue
            yield self._accept(record.get(self.text_field), record.get("meta"), unit, index), index + 1
