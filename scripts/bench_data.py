"""Data pipeline throughput on this CPU over a generated SlimPajama-layout fixture (no network).

    python scripts/bench_data.py --docs 4000 --workers 1 2

Prints a markdown table: raw sentencepiece encoding, then the full loader (read .jsonl.zst, parse, tokenize,
shuffle, pack) for each worker count, as tokens/s in total and per worker.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

import zstandard

from mom_train.config import load_config
from mom_train.data import build_loader, load_tokenizer

WORDS = ("memory", "router", "state", "delta", "gate", "token", "mixture", "linear", "attention", "recall", "the",
         "of", "a", "and", "model", "sequence", "chunk", "kernel", "pretraining", "throughput", "über", "数据")


def write_fixture(root: Path, num_docs: int, num_files: int, words_per_doc: int, seed: int = 0) -> list[str]:
    """SlimPajama-layout files under root/train; returns the texts."""
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(words_per_doc // 2, words_per_doc * 3 // 2)))
             for _ in range(num_docs)]
    for f in range(num_files):
        lines = [json.dumps({"text": t, "meta": {"redpajama_set_name": "RedPajamaC4"}}).encode()
                 for t in texts[f::num_files]]
        path = root / "train" / f"chunk{f % 2 + 1}" / f"example_train_{f}.jsonl.zst"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(zstandard.ZstdCompressor().compress(b"\n".join(lines) + b"\n"))
    return texts


def bench_encode(texts: list[str], num_threads: int) -> float:
    tok = load_tokenizer("mistral-v1")
    start = time.perf_counter()
    ids = tok.encode_batch(texts, add_bos=True, num_threads=num_threads)
    return sum(map(len, ids)) / (time.perf_counter() - start)


def bench_loader(root: Path, num_workers: int, seq_len: int, micro_batch_size: int) -> tuple[float, int]:
    cfg = load_config(None, ["data.source=slimpajama", f"data.path={root}", f"data.num_workers={num_workers}",
                             f"training.seq_len={seq_len}", f"training.micro_batch_size={micro_batch_size}",
                             "data.prefetch=4", "data.shuffle_buffer=1024", "training.warmup_steps=0"])
    loader = build_loader(cfg, max_epochs=1)
    start = time.perf_counter()
    num_tokens = sum(b.input_ids.numel() for b in loader)
    loader.close()
    return num_tokens / (time.perf_counter() - start), num_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=4000)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--words-per-doc", type=int, default=300)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        texts = write_fixture(root, args.docs, args.files, args.words_per_doc)
        size_mb = sum(p.stat().st_size for p in root.rglob("*.zst")) / 2 ** 20
        print(f"fixture: {args.docs} docs in {args.files} .jsonl.zst files ({size_mb:.1f} MiB compressed); "
              f"{os.cpu_count()} CPUs; batches of {args.micro_batch_size} x {args.seq_len} tokens\n")
        print("| stage | workers | tokens/s | tokens/s per worker |")
        print("|---|---|---|---|")
        for threads in sorted({1, max(args.workers)}):
            rate = bench_encode(texts, threads)
            print(f"| sentencepiece encode (num_threads={threads}) | {threads} | {rate:,.0f} | {rate / threads:,.0f} |")
        for workers in args.workers:
            rate, _ = bench_loader(root, workers, args.seq_len, args.micro_batch_size)
            print(f"| loader: zstd + json + tokenize + shuffle + pack | {workers} | {rate:,.0f} | "
                  f"{rate / workers:,.0f} |")


if __name__ == "__main__":
    main()
