"""Stateful data loaders: `build_loader(cfg, dp_rank, dp_size, split, seed_offset)` -> iterator of `Batch`.

Text pipeline of one data-parallel rank (deterministic for a given seed, dp size and data.num_workers):

    worker w (thread): read its shard (sources.py) -> chunks of CHUNK_DOCS texts -> tokenize (BOS per doc)
    producer (prefetch thread, data.prefetch batches deep): take one chunk from each worker in turn
        -> shuffle buffer of data.shuffle_buffer documents -> Packer -> Batch, with a state snapshot

A chunk carries the worker's cursor (epoch, unit, record) right after its last record, so a snapshot taken
with a batch holds exactly what was consumed: worker cursors, shuffle buffer, shuffle RNG, packer leftovers
and cumulative stats. `state_dict()` returns the snapshot of the last batch returned by `__next__`, with each
document of the shuffle buffer and the packer named by its source (worker, epoch, unit, record, token
offset) instead of its tokens, so the state stays small however long the documents are; after
`load_state_dict` those documents are read and tokenized again, the workers reopen their files at the
cursors and the stream continues with the exact next token. MQAR batches are pure functions of (seed, split,
batch index, rank), so their state is a counter.
"""
from __future__ import annotations

import queue
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from mom_train.config import Config, ConfigError
from mom_train.errors import DataError
from mom_train.data.mqar import check_mqar, generate_mqar
from mom_train.data.packing import Batch, Packer
from mom_train.data.sources import STAT_KEYS, RecordReader, resolve_files, shard_units
from mom_train.data.tokenizer import Tokenizer, load_tokenizer

# documents a worker reads and tokenizes at once
CHUNK_DOCS = 64
# seconds between checks of the stop flag while a queue is full or empty
POLL_S = 0.1
SPLITS = {"train": 0, "eval": 1}


def build_loader(cfg: Config, dp_rank: int = 0, dp_size: int = 1, split: str = "train", seed_offset: int = 0,
                 max_epochs: int | None = None) -> Loader:
    """The loader of data-parallel rank `dp_rank` of `dp_size` for `split` ("train" or "eval").

    Infinite by default (text loops over epochs); `max_epochs` ends a text stream after that many epochs,
    with the last partial batch padded (token 0, label -100). Bad paths fail here with a ConfigError.
    """
    if split not in SPLITS:
        raise ConfigError(f"data split must be 'train' or 'eval', got {split!r}")
    if not 0 <= dp_rank < dp_size:
        raise ConfigError(f"data-parallel rank {dp_rank} is outside [0, {dp_size}) for dp size {dp_size}")
    if cfg.data.source == "mqar":
        return MQARLoader(cfg, dp_rank, dp_size, split, seed_offset)
    return TextLoader(cfg, dp_rank, dp_size, split, seed_offset, max_epochs)


def _seed(seed: int) -> int:
    # numpy seed sequences take non-negative integers
    return seed % 2 ** 63


def _check_topology(sd: dict, kind: str, dp_rank: int, dp_size: int) -> None:
    if sd.get("kind") != kind:
        raise ConfigError(f"data loader state is for a {sd.get('kind')!r} source but this run's data.source "
                          f"builds a {kind!r} loader; resume with the same data.source")
    if sd["dp_size"] != dp_size:
        raise ConfigError(f"data loader state was saved with data-parallel size {sd['dp_size']} but this run has "
                          f"{dp_size} (world size / (parallel.tp * parallel.cp)); resume with the same world size "
                          "and parallel settings, or start fresh with checkpoint.resume=none")
    if sd["dp_rank"] != dp_rank:
        raise ConfigError(f"data loader state of data-parallel rank {sd['dp_rank']} loaded on rank {dp_rank}; "
                          "each rank must load its own data state")


class MQARLoader:
    """Synthetic MQAR batches: micro_batch_size sequences of seq_len tokens packed as [1, T]."""

    def __init__(self, cfg: Config, dp_rank: int, dp_size: int, split: str, seed_offset: int):
        self.mqar = cfg.data.mqar
        self.seq_len = cfg.training.seq_len
        self.micro_batch_size = cfg.training.micro_batch_size
        check_mqar(self.mqar, self.seq_len)
        if cfg.model.vocab_size < self.mqar.vocab_size:
            raise ConfigError(f"`model.vocab_size` = {cfg.model.vocab_size} is smaller than `data.mqar.vocab_size`"
                              f" = {self.mqar.vocab_size}; set model.vocab_size >= data.mqar.vocab_size")
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed = _seed(cfg.run.seed + seed_offset)
        self.split = split
        self.batches = 0
        self.packer = Packer(self.micro_batch_size * self.seq_len)

    def __iter__(self) -> MQARLoader:
        return self

    def __next__(self) -> Batch:
        rng = np.random.default_rng([self.seed, SPLITS[self.split], self.batches, self.dp_rank])
        ids, labels = generate_mqar(self.mqar, self.seq_len, self.micro_batch_size, rng)  # [B, L] each
        for i in range(self.micro_batch_size):
            self.packer.add(ids[i], labels[i])
        input_ids, labels, cu_seqlens = self.packer.pop()
        self.batches += 1
        num_docs = self.batches * self.micro_batch_size
        stats = {"documents": num_docs, "tokens": num_docs * self.seq_len, "batches": self.batches}
        return Batch(input_ids, labels, cu_seqlens, stats)

    def state_dict(self) -> dict:
        return {"kind": "mqar", "dp_rank": self.dp_rank, "dp_size": self.dp_size, "seed": self.seed,
                "split": self.split, "batches": self.batches}

    def load_state_dict(self, sd: dict) -> None:
        _check_topology(sd, "mqar", self.dp_rank, self.dp_size)
        self.seed, self.split, self.batches = sd["seed"], sd["split"], sd["batches"]

    def close(self) -> None:
        pass


@dataclass
class _Chunk:
    """Tokenized documents of one worker, where each came from (epoch, unit, record), and the worker's cursor
    (epoch, unit, record) right after them."""
    docs: list[torch.Tensor]
    sources: list[tuple[int, int, int]]
    cursor: tuple[int, int, int]
    stats: Counter
    # set at an epoch end: True when that whole epoch had no valid document
    empty_epoch: bool | None = None
    finished: bool = False


@dataclass
class _ShardSpec:
    files: list[str] | None
    shard: int
    num_shards: int
    seed: int
    max_epochs: int | None
    reader_args: dict = field(default_factory=dict)


def _shard_chunks(spec: _ShardSpec, cursor: tuple[int, int, int], tokenize: Callable[[list[str]], list]
                  ) -> Iterator[_Chunk]:
    """The chunks of one shard from `cursor` on, epoch after epoch."""
    stats: Counter = Counter()
    reader = RecordReader(stats=stats, seed=spec.seed, **spec.reader_args)
    epoch, first_unit, first_record = cursor
    from_start = first_unit == 0 and first_record == 0

    def emit(texts: list[str], sources: list[tuple[int, int, int]], at: tuple[int, int, int], **kw) -> _Chunk:
        docs = tokenize(texts)
        stats["documents"] += len(docs)
        stats["tokens"] += sum(d.numel() for d in docs)
        delta = stats.copy()
        stats.clear()
        return _Chunk(docs, sources, at, delta, **kw)

    while spec.max_epochs is None or epoch < spec.max_epochs:
        units = shard_units(spec.files, spec.shard, spec.num_shards, epoch, spec.seed)
        texts: list[str] = []
        sources: list[tuple[int, int, int]] = []
        num_docs = 0
        for u in range(first_unit, len(units)):
            for text, next_record in reader.read(units[u], first_record if u == first_unit else 0):
                if text is None:
                    continue
                texts.append(text)
                sources.append((epoch, u, next_record - 1))
                num_docs += 1
                if len(texts) == CHUNK_DOCS:
                    yield emit(texts, sources, (epoch, u, next_record))
                    texts, sources = [], []
        epoch, first_unit, first_record = epoch + 1, 0, 0
        yield emit(texts, sources, (epoch, 0, 0), empty_epoch=from_start and num_docs == 0)
        from_start = True
    yield emit([], [], (epoch, 0, 0), finished=True)


class _Worker:
    """Runs a chunk generator, in a daemon thread with a small queue when `threaded`, else on demand."""

    def __init__(self, chunks: Iterator[_Chunk], threaded: bool, stop: threading.Event, name: str):
        self.chunks = chunks
        self.stop = stop
        self.queue: queue.Queue | None = None
        if threaded:
            self.queue = queue.Queue(maxsize=2)
            self.thread = threading.Thread(target=self._run, name=name, daemon=True)
            self.thread.start()

    def _run(self) -> None:
        try:
            for chunk in self.chunks:
                if not _put(self.queue, chunk, self.stop):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            _put(self.queue, e, self.stop)

    def get(self) -> _Chunk:
        if self.queue is None:
            return next(self.chunks)
        item = _get(self.queue, self.stop)
        if isinstance(item, BaseException):
            raise item
        return item

    def join(self) -> None:
        if self.queue is not None:
            self.thread.join(timeout=5)


def _put(q: queue.Queue, item: object, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=POLL_S)
            return True
        except queue.Full:
            continue
    return False


def _get(q: queue.Queue, stop: threading.Event) -> object:
    while True:
        try:
            return q.get(timeout=POLL_S)
        except queue.Empty:
            if stop.is_set():
                raise RuntimeError("data loader was closed") from None


_END = object()


class TextLoader:
    """Tokenized, packed text of one data-parallel rank; see the module docstring."""

    def __init__(self, cfg: Config, dp_rank: int, dp_size: int, split: str, seed_offset: int,
                 max_epochs: int | None = None):
        data = cfg.data
        for name, weight in (data.subset_weights or {}).items():
            if not 0.0 <= weight <= 1.0:
                raise ConfigError(f"`data.subset_weights.{name}` = {weight} must be a keep probability in [0, 1]")
        self.files = resolve_files(data, split)
        self.tokenizer: Tokenizer = load_tokenizer(data.tokenizer)
        if self.tokenizer.vocab_size > cfg.model.vocab_size:
            raise ConfigError(f"tokenizer {data.tokenizer!r} has {self.tokenizer.vocab_size} tokens but "
                              f"`model.vocab_size` = {cfg.model.vocab_size}; set model.vocab_size >= "
                              f"{self.tokenizer.vocab_size}")
        self.add_bos, self.add_eos = data.add_bos, data.add_eos
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.num_workers = max(1, data.num_workers)
        self.threaded = data.num_workers > 0
        self.prefetch = data.prefetch
        self.shuffle_buffer = data.shuffle_buffer
        self.num_tokens = cfg.training.micro_batch_size * cfg.training.seq_len
        self.split = split
        self.seed = _seed(cfg.run.seed + seed_offset)
        self.max_epochs = max_epochs
        self.reader_args = {"text_field": data.text_field, "subset_weights": data.subset_weights,
                            "hub_split": split}
        rng = np.random.default_rng([self.seed, SPLITS[split], dp_rank])
        self._state = {
            "kind": "text", "dp_rank": dp_rank, "dp_size": dp_size, "num_workers": self.num_workers,
            "cursors": [(0, 0, 0)] * self.num_workers, "next_worker": 0,
            "finished": [False] * self.num_workers, "empty": [False] * self.num_workers,
            "buffer": [], "rng": rng.bit_generator.state, "packer": {"sources": []}, "stats": {}, "batches": 0,
        }
        self._running = False
        self._exhausted = False

    # ------------------------------------------------------------------ public interface

    def __iter__(self) -> TextLoader:
        return self

    def __next__(self) -> Batch:
        if self._exhausted:
            raise StopIteration
        if not self._running:
            self._start()
        if self.prefetch == 0:
            item = self._produce()
        else:
            item = _get(self._out, self._stop)
            if isinstance(item, BaseException):
                raise item
        if item is _END:
            self._exhausted = True
            raise StopIteration
        batch, self._state = item
        return batch

    def state_dict(self) -> dict:
        """Position right after the last batch returned by __next__, documents named by their sources (see
        the module docstring): a few numbers per buffered document, no tokens."""
        sd = dict(self._state)
        sd["cursors"] = list(sd["cursors"])
        if "pending" in sd["packer"]:
            sd["buffer"] = [source for _, source in sd["buffer"]]
            sd["packer"] = {"sources": [source for _, _, source in sd["packer"]["pending"]]}
        return sd

    def load_state_dict(self, sd: dict) -> None:
        _check_topology(sd, "text", self.dp_rank, self.dp_size)
        if sd["num_workers"] != self.num_workers:
            raise ConfigError(f"data loader state was saved with {sd['num_workers']} workers per rank but "
                              f"`data.num_workers` gives {self.num_workers}; the shard layout depends on it, so "
                              "resume with the same data.num_workers")
        self.close()
        self._state = dict(sd)
        self._exhausted = False

    def close(self) -> None:
        if not self._running:
            return
        self._stop.set()
        for w in self._workers:
            w.join()
        if self.prefetch:
            self._thread.join(timeout=5)
        self._running = False

    def __del__(self) -> None:
        if getattr(self, "_running", False):
            self.close()

    # ------------------------------------------------------------------ pipeline

    def _tokenize(self, texts: list[str]) -> list[torch.Tensor]:
        ids = self.tokenizer.encode_batch(texts, add_bos=self.add_bos, add_eos=self.add_eos)
        return [torch.tensor(x, dtype=torch.int32) for x in ids]

    def _start(self) -> None:
        """Restore the mutable pipeline from self._state and start the worker and prefetch threads."""
        st = self._state
        self._stop = threading.Event()
        self._cursors = list(st["cursors"])
        self._next_worker = st["next_worker"]
        self._finished = list(st["finished"])
        self._empty = list(st["empty"])
        self._rng = np.random.default_rng()
        self._rng.bit_generator.state = st["rng"]
        self._packer = Packer(self.num_tokens)
        if "pending" in st["packer"]:
            self._buffer = list(st["buffer"])
            self._packer.load_state_dict(st["packer"])
        else:
            # a saved state: read the documents it names again
            buffered, pending = st["buffer"], st["packer"]["sources"]
            docs = self._read_sources(buffered + pending)
            self._buffer = list(zip(docs[:len(buffered)], buffered))
            self._packer.load_state_dict({"pending": [(d, None, s) for d, s in zip(docs[len(buffered):], pending)]})
        self._stats = Counter(st["stats"])
        self._batches = st["batches"]
        self._workers = []
        for w in range(self.num_workers):
            spec = _ShardSpec(self.files, self.dp_rank * self.num_workers + w, self.dp_size * self.num_workers,
                              self.seed, self.max_epochs, self.reader_args)
            chunks = _shard_chunks(spec, tuple(self._cursors[w]), self._tokenize)
            self._workers.append(_Worker(chunks, self.threaded, self._stop, f"data-worker-{w}"))
        if self.prefetch:
            self._out = queue.Queue(maxsize=self.prefetch)
            self._thread = threading.Thread(target=self._prefetch, name="data-prefetch", daemon=True)
            self._thread.start()
        self._running = True

    def _prefetch(self) -> None:
        try:
            while True:
                item = self._produce()
                if not _put(self._out, item, self._stop) or item is _END:
                    return
        except BaseException as e:  # noqa: BLE001 - re-raised by __next__
            _put(self._out, e, self._stop)

    def _produce(self) -> tuple[Batch, dict] | object:
        """The next batch and the state right after it, or _END when a finite stream is exhausted."""
        while not self._packer.ready():
            if not self._pull():
                break
        if self._packer.ready():
            out = self._packer.pop()
        else:
            # every worker finished its epochs: drain the shuffle buffer, then pad the leftover
            while self._buffer:
                self._packer.add(*self._take(self._buffer.pop(int(self._rng.integers(len(self._buffer))))))
            out = self._packer.pop() if self._packer.ready() else self._packer.flush()
            if out is None:
                return _END
        self._batches += 1
        stats = dict.fromkeys(STAT_KEYS, 0) | dict(self._stats)
        stats["batches"] = self._batches
        stats["epoch"] = min(c[0] for c in self._cursors)
        return Batch(*out, stats=stats), self._snapshot()

    def _pull(self) -> bool:
        """Move one chunk of the next unfinished worker (round-robin) into the shuffle buffer."""
        if all(self._finished):
            return False
        w = self._next_worker
        chunk = self._workers[w].get()
        self._cursors[w] = chunk.cursor
        self._stats.update(chunk.stats)
        self._finished[w] = chunk.finished
        self._next_worker = (w + 1) % self.num_workers
        while self._finished[self._next_worker] and not all(self._finished):
            self._next_worker = (self._next_worker + 1) % self.num_workers
        if chunk.empty_epoch:
            self._empty[w] = True
        elif chunk.docs:
            self._empty[w] = False
        if all(self._empty):
            where = "the hub stream" if self.files is None else f"{len(self.files)} files (first: {self.files[0]})"
            raise ConfigError(f"no valid documents for data-parallel rank {self.dp_rank} in a whole epoch of "
                              f"{where}; skipped so far: {dict(self._stats)}. Check the data, data.text_field and "
                              "data.subset_weights, or use fewer data-parallel ranks / data.num_workers")
        for doc, (epoch, unit, record) in zip(chunk.docs, chunk.sources):
            self._shuffle_in((doc, (w, epoch, unit, record, 0)))
        return True

    def _shuffle_in(self, doc: tuple[torch.Tensor, tuple]) -> None:
        """doc: (tokens, source (worker, epoch, unit, record, token offset))."""
        if self.shuffle_buffer == 0:
            self._packer.add(*self._take(doc))
        elif len(self._buffer) < self.shuffle_buffer:
            self._buffer.append(doc)
        else:
            i = int(self._rng.integers(self.shuffle_buffer))
            self._packer.add(*self._take(self._buffer[i]))
            self._buffer[i] = doc

    @staticmethod
    def _take(doc: tuple[torch.Tensor, tuple]) -> tuple[torch.Tensor, None, tuple]:
        """A buffered (tokens, source) as the packer's (tokens, labels, source)."""
        return doc[0], None, doc[1]

    def _read_sources(self, sources: list[tuple]) -> list[torch.Tensor]:
        """The tokens of the documents named by `sources` (worker, epoch, unit, record, token offset), read
        from their files again (each file once, up to its last needed record) and tokenized."""
        wanted: dict[tuple[int, int, int], set[int]] = {}
        for w, epoch, unit, record, _ in sources:
            wanted.setdefault((w, epoch, unit), set()).add(record)
        reader = RecordReader(stats=Counter(), seed=self.seed, **self.reader_args)
        texts: dict[tuple[int, int, int, int], str] = {}
        for (w, epoch, u), records in wanted.items():
            shard = self.dp_rank * self.num_workers + w
            unit = shard_units(self.files, shard, self.dp_size * self.num_workers, epoch, self.seed)[u]
            left = set(records)
            for text, next_record in reader.read(unit, min(records)):
                if next_record - 1 in left and text is not None:
                    texts[(w, epoch, u, next_record - 1)] = text
                    left.discard(next_record - 1)
                if not left:
                    break
            if left:
                raise DataError(f"resuming the data stream needs record {min(left)} of {unit.path}, which is no "
                                "longer there: the data changed since the checkpoint. Restore it, or start fresh "
                                "with checkpoint.resume=none")
        docs = self._tokenize([texts[source[:4]] for source in sources])
        return [doc[source[4]:] for doc, source in zip(docs, sources)]

    def _snapshot(self) -> dict:
        return {
            "kind": "text", "dp_rank": self.dp_rank, "dp_size": self.dp_size, "num_workers": self.num_workers,
            "cursors": list(self._cursors), "next_worker": self._next_worker, "finished": list(self._finished),
            "empty": list(self._empty), "buffer": list(self._buffer), "rng": self._rng.bit_generator.state,
            "packer": self._packer.snapshot(), "stats": dict(self._stats), "batches": self._batches,
        }


# what build_loader returns: an iterator of Batch with state_dict / load_state_dict / close
Loader = MQARLoader | TextLoader
