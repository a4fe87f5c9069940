"""The exported Hugging Face tokenizer encodes and decodes exactly like the run's sentencepiece model (Mistral
v1), with the run's BOS policy, over a few hundred varied strings."""
from __future__ import annotations

import random

import pytest
import sentencepiece as spm

from mom_train.data.tokenizer import mistral_v1_path
from mom_train.hf import export_checkpoint
from tests.hf.helpers import random_checkpoint, tiny_config

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

EDGE_CASES = [
    "", " ", "  ", "   ", "\n", "\t", "a", " a", "  a", "a ", "a  ", " a b  c   d ", "hello world", " leading",
    "trailing ", "line one\nline two\n\n  indented\n", "\r\nwindows\r\n", "tabs\tand\tspaces \t mixed",
    "12345", "3.14159", "1,000,000", "2026-06-07", "x1y2z3", "007 agents", "0x1F600", "1e-6", "  42  ",
    "naïve café über", "数据 科学", "Привет, мир", "مرحبا بالعالم", "שלום", "こんにちは世界", "한국어 텍스트",
    "🙂", "👩\u200d💻 codes", "emoji 🎉🎉 twice", "\u00a0nbsp\u00a0", "ideographic\u3000space", "zero\u200bwidth",
    "combining e\u0301", "ﬁ ligature", "Ⅻ roman", "\x07bell", "<s>", "</s>", "<unk>", "text <s> inside </s>",
    "\u2581 lower one eighth block", "▁▁ pieces", "def f(x):\n    return x  # comment\n", "{\"json\": [1, 2]}",
    "a" * 100, " " * 17 + "x", "\n" * 5, "MixtureOfMemories", "ALL CAPS SHOUT", "mIxEd CaSe",
    "end.", "...", "—dash—", "'quotes' \"double\"", "back\\slash", "https://example.com/a?b=c&d=e",
]

FRAGMENTS = [
    "the", "memory", "routing", " of", " tokens", "Mixture", "数据", "Привет", "مرحبا", "naïve", "🙂", "👍🏽",
    "0", "7", "42", "3.14", "1,000", "-5", " ", "  ", "   ", "    ", "\t", "\n", "\n\n", "\r\n", "\u00a0",
    "!", "?", ".", ",", "...", "—", "'", "\"", "(", ")", "<", ">", "<s>", "</s>", "#", "$", "%", "&", "*",
    "def", "():", "    return", "{", "}", "[", "]", "=", "==", "x", "é", "ß", "ø", "\u200b", "ﬁ",
]


def varied_strings(count: int, seed: int = 0) -> list[str]:
    """Hand-picked edge cases, then random joins of 1-12 fragments (spaces, digits, scripts, code, specials)."""
    rng = random.Random(seed)
    made = ["".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 12))) for _ in range(count)]
    return EDGE_CASES + made


@pytest.fixture(scope="module")
def sentencepiece():
    return spm.SentencePieceProcessor(model_file=str(mistral_v1_path()))


def export_tokenizer(tmp_path, *overrides: str):
    cfg = tiny_config(tmp_path / "runs", "text", "mom", *overrides, text=True)
    random_checkpoint(cfg)
    out = export_checkpoint(cfg.run.path, tmp_path / "hf")
    return cfg, transformers.AutoTokenizer.from_pretrained(out)


def test_hf_tokenizer_equals_sentencepiece_with_bos(tmp_path, sentencepiece):
    cfg, tok = export_tokenizer(tmp_path)
    assert cfg.data.add_bos
    strings = varied_strings(300)
    assert len(set(strings)) > 300
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    assert tok.model_max_length == cfg.training.seq_len
    for text in strings:
        ids = sentencepiece.encode(text)
        assert tok(text)["input_ids"] == [1] + ids, text
        assert tok(text, add_special_tokens=False)["input_ids"] == ids, text
        assert tok.decode(ids) == sentencepiece.decode(ids), text
    # batched encoding (the fast tokenizer's parallel path) too
    assert tok(strings)["input_ids"] == sentencepiece.encode(strings, add_bos=True)


def test_hf_tokenizer_follows_a_run_without_bos(tmp_path, sentencepiece):
    _, tok = export_tokenizer(tmp_path, "data.add_bos=false")
    for text in varied_strings(20, seed=1):
        assert tok(text)["input_ids"] == sentencepiece.encode(text), text
