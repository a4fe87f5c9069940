"""Generated SlimPajama-layout fixtures (train/chunkN/example_train_M.jsonl.zst + validation/...), no network.

    ids = write_slimpajama(tmp_path, num_docs=40)   # document i's text starts with "id{i:05d}:"
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

import zstandard

SETS = ("RedPajamaCommonCrawl", "RedPajamaC4", "RedPajamaGithub", "RedPajamaArXiv", "RedPajamaWikipedia")
WORDS = ("memory", "router", "state", "delta", "gate", "token", "mixture", "linear", "attention", "recall",
         "the", "of", "a", "and", "model", "sequence", "chunk", "kernel", "über", "naïve", "数据", "🙂")
ID_RE = re.compile(r"id(\d{5}):")


def doc_text(i: int, rng: random.Random, max_words: int = 60) -> str:
    return f"id{i:05d}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max_words)))


def doc_ids(text: str) -> list[int]:
    """The fixture ids appearing in a decoded text."""
    return [int(m) for m in ID_RE.findall(text)]


def write_zst_jsonl(path: Path, lines: list[bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(zstandard.ZstdCompressor().compress(b"".join(line + b"\n" for line in lines)))


def write_slimpajama(root: Path, num_docs: int = 40, num_chunks: int = 2, files_per_chunk: int = 2,
                     num_eval_docs: int = 8, seed: int = 0, max_words: int = 60) -> dict[str, list[int]]:
    """Write a SlimPajama-layout mirror under `root`; returns the doc ids per split ("train", "eval").

    Train ids are 0..num_docs-1, eval ids follow; documents are spread round-robin over the files.
    """
    rng = random.Random(seed)
    out = {}
    for split, sub, stem, first, count in (("train", "train", "example_train", 0, num_docs),
                                            ("eval", "validation", "example_holdout", num_docs, num_eval_docs)):
        num_files = num_chunks * files_per_chunk
        per_file: list[list[bytes]] = [[] for _ in range(num_files)]
        for i in range(first, first + count):
            record = {"text": doc_text(i, rng, max_words), "meta": {"redpajama_set_name": SETS[i % len(SETS)]}}
            per_file[i % num_files].append(json.dumps(record).encode())
        for f, lines in enumerate(per_file):
            chunk, m = divmod(f, files_per_chunk)
            write_zst_jsonl(root / sub / f"chunk{chunk + 1}" / f"{stem}_{m}.jsonl.zst", lines)
        out[split] = list(range(first, first + count))
    return out
