"""Sentencepiece tokenizer: the Mistral v1 model shipped inside `mistral-common` (no network) or any `.model` file.

    tok = load_tokenizer("mistral-v1")       # vocab 32000, bos 1, eos 2
    ids = tok.encode_batch(["a doc", "another"], add_bos=True, add_eos=False, num_threads=2)
"""
from __future__ import annotations

import importlib.resources
from pathlib import Path

import sentencepiece as spm

from mom_train.config import ConfigError

MISTRAL_V1 = "mistral-v1"


def mistral_v1_path() -> Path:
    """Path of `tokenizer.model.v1` inside the installed mistral-common package (package data, no download)."""
    try:
        root = importlib.resources.files("mistral_common")
    except ModuleNotFoundError:
        raise ConfigError("data.tokenizer = 'mistral-v1' needs the `mistral-common` package; "
                          "pip install mistral-common, or set data.tokenizer to a sentencepiece .model path") from None
    path = Path(str(root / "data" / "tokenizer.model.v1"))
    if not path.is_file():
        raise ConfigError(f"mistral-common is installed but has no tokenizer.model.v1 at {path}; "
                          "reinstall mistral-common or set data.tokenizer to a sentencepiece .model path")
    return path


class Tokenizer:
    """A thin wrapper over `SentencePieceProcessor` with batched, multi-threaded encoding."""

    def __init__(self, model_path: str | Path):
        self.path = Path(model_path)
        self.sp = spm.SentencePieceProcessor(model_file=str(self.path))

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    def encode_batch(self, texts: list[str], add_bos: bool = True, add_eos: bool = False,
                     num_threads: int = 1) -> list[list[int]]:
        """Token ids of each text; sentencepiece encodes the list on `num_threads` C++ threads."""
        if not texts:
            return []
        return self.sp.encode(texts, out_type=int, add_bos=add_bos, add_eos=add_eos, num_threads=num_threads)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


def load_tokenizer(name: str) -> Tokenizer:
    """`name` is "mistral-v1" (the model shipped with mistral-common) or a path to a sentencepiece `.model`."""
    if name == MISTRAL_V1:
        return Tokenizer(mistral_v1_path())
    path = Path(name).expanduser()
    if not path.is_file():
        raise ConfigError(f"data.tokenizer = {name!r}: no such file; give a sentencepiece .model path or "
                          f"'{MISTRAL_V1}'")
    try:
        return Tokenizer(path)
    except (OSError, RuntimeError) as e:
        raise ConfigError(f"data.tokenizer = {name!r} is not a readable sentencepiece model: {e}") from None
