import sentencepiece as spm
import pytest

from mom_train.config import ConfigError
from mom_train.data.tokenizer import load_tokenizer, mistral_v1_path

TEXTS = ["Mixture-of-Memories keeps several memories.", "über naïve 数据 🙂", " leading space", "x"]


def test_mistral_v1_ids_equal_raw_sentencepiece():
    tok = load_tokenizer("mistral-v1")
    raw = spm.SentencePieceProcessor(model_file=str(mistral_v1_path()))
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (32000, 1, 2)
    got = tok.encode_batch(TEXTS, add_bos=False, add_eos=False, num_threads=2)
    assert got == [raw.encode(t) for t in TEXTS]
    with_bos = tok.encode_batch(TEXTS, add_bos=True, add_eos=True)
    assert with_bos == [[1] + raw.encode(t) + [2] for t in TEXTS]


def test_model_by_path_and_missing_path():
    tok = load_tokenizer(str(mistral_v1_path()))
    assert tok.encode_batch(["hello"], add_bos=True)[0][0] == 1
    with pytest.raises(ConfigError, match="no_such.model"):
        load_tokenizer("/nonexistent/no_such.model")
