"""Write a local corpus in SlimPajama's layout from a bigram grammar, for runs and benchmarks without the hub.

    python scripts/make_corpus.py /data/bigram --train-docs 200000 --valid-docs 2000
    mom-train train --config configs/mom_340m.yaml data.path=/data/bigram

Layout: <root>/train/chunk<c>/example_train_<i>.jsonl.zst and <root>/validation/chunk1/example_holdout_<i>.jsonl.zst,
one JSON object per line: {"text": ..., "meta": {"redpajama_set_name": ...}}. Text: sentences of words drawn
from a fixed vocabulary by a sparse random bigram model (each word has a few likely successors), so a language
model's loss falls well below the unigram entropy as it learns the grammar. Deterministic for a seed.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import zstandard

SUBSETS = ("RedPajamaC4", "RedPajamaCommonCrawl", "RedPajamaWikipedia", "RedPajamaBook", "RedPajamaArXiv")


class BigramGrammar:
    """`num_words` pseudo-words, each followed by one of `fanout` successors with Zipf-like probabilities."""

    def __init__(self, num_words: int, fanout: int, seed: int):
        rng = np.random.default_rng(seed)
        letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
        lengths = rng.integers(2, 9, num_words)
        self.words = ["".join(rng.choice(letters, n)) for n in lengths]
        self.successors = rng.integers(0, num_words, (num_words, fanout))
        weights = 1.0 / np.arange(1, fanout + 1)
        self.probs = weights / weights.sum()

    def document(self, rng: np.random.Generator, num_words: int) -> str:
        word = int(rng.integers(len(self.words)))
        out, sentence = [], []
        for _ in range(num_words):
            sentence.append(self.words[word])
            word = int(self.successors[word, rng.choice(len(self.probs), p=self.probs)])
            if len(sentence) >= 4 and rng.random() < 0.08:
                out.append(" ".join(sentence).capitalize() + ".")
                sentence = []
        if sentence:
            out.append(" ".join(sentence).capitalize() + ".")
        return " ".join(out)


def write_split(root: Path, split: str, stem: str, num_docs: int, docs_per_file: int, files_per_chunk: int,
                grammar: BigramGrammar, rng: np.random.Generator, mean_words: int) -> int:
    """Write one split; returns the number of files."""
    compressor = zstandard.ZstdCompressor(level=3)
    num_files = -(-num_docs // docs_per_file)
    for i in range(num_files):
        chunk = root / split / f"chunk{i // files_per_chunk + 1}"
        chunk.mkdir(parents=True, exist_ok=True)
        count = min(docs_per_file, num_docs - i * docs_per_file)
        lines = []
        for _ in range(count):
            words = max(5, int(rng.exponential(mean_words)))
            record = {"text": grammar.document(rng, words),
                      "meta": {"redpajama_set_name": SUBSETS[int(rng.integers(len(SUBSETS)))]}}
            lines.append(json.dumps(record))
        (chunk / f"{stem}_{i}.jsonl.zst").write_bytes(compressor.compress(("\n".join(lines) + "\n").encode()))
    return num_files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path)
    parser.add_argument("--train-docs", type=int, default=20000)
    parser.add_argument("--valid-docs", type=int, default=500)
    parser.add_argument("--docs-per-file", type=int, default=2000)
    parser.add_argument("--files-per-chunk", type=int, default=10)
    parser.add_argument("--words", type=int, default=5000, help="vocabulary of the grammar")
    parser.add_argument("--fanout", type=int, default=8, help="successors per word")
    parser.add_argument("--mean-words", type=int, default=400, help="mean document length in words")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    grammar = BigramGrammar(args.words, args.fanout, args.seed)
    rng = np.random.default_rng(args.seed + 1)
    train = write_split(args.root, "train", "example_train", args.train_docs, args.docs_per_file,
                        args.files_per_chunk, grammar, rng, args.mean_words)
    valid = write_split(args.root, "validation", "example_holdout", args.valid_docs, args.docs_per_file,
                        args.files_per_chunk, grammar, rng, args.mean_words)
    print(f"wrote {train} train and {valid} validation files under {args.root}")


if __name__ == "__main__":
    main()
