"""A Hugging Face tokenizer that encodes exactly like our sentencepiece model, with our BOS policy.

Our sentencepiece models (Mistral v1) are BPE with `add_dummy_prefix`, no whitespace cleanup, byte fallback and
no text normalisation. The `tokenizers` equivalent built here:
- normaliser: prepend "▁" to the text, then every " " -> "▁" (sentencepiece's dummy prefix and whitespace
  escape; leading and repeated spaces are kept, as sentencepiece keeps them);
- model: BPE over the sentencepiece vocabulary with byte fallback; its merges are every split of a piece into
  two pieces of the vocabulary, ranked by the merged piece's score (sentencepiece merges the pair whose
  result scores highest), then by id;
- no pre-tokeniser, so runs of spaces merge into the whitespace pieces as sentencepiece merges them;
- decoder: "▁" -> " ", bytes fused back into text, the dummy prefix stripped;
- post-processor: BOS before the text when the run's data.add_bos (EOS is a document terminator in
  training, not something a tokenizer call adds);
- `split_special_tokens`: a literal "<s>" in the text is encoded as characters, as sentencepiece does.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from mom_train.config import ConfigError

# sentencepiece ModelProto.SentencePiece.Type
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"


def _load_proto(sp_path: Path):
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as exc:  # the generated module imports google.protobuf
        raise ConfigError(
            f"reading the sentencepiece model {sp_path} for the Hugging Face tokenizer needs protobuf ({exc}); "
            "install it with `pip install protobuf` or `pip install -e '.[hf]'`"
        ) from exc

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(sp_path).read_bytes())
    return proto


def _check_supported(proto, sp_path: Path) -> None:
    """Refuse sentencepiece options the conversion does not reproduce."""
    norm, trainer = proto.normalizer_spec, proto.trainer_spec
    problems = []
    if trainer.model_type != trainer.BPE:
        problems.append(f"model_type {trainer.ModelType.Name(trainer.model_type)} (only BPE is converted)")
    if norm.remove_extra_whitespaces:
        problems.append("remove_extra_whitespaces=true")
    if not norm.add_dummy_prefix:
        problems.append("add_dummy_prefix=false")
    if norm.name not in ("identity", "") or norm.precompiled_charsmap:
        problems.append(f"text normalisation {norm.name!r}")
    if trainer.treat_whitespace_as_suffix:
        problems.append("treat_whitespace_as_suffix=true")
    if any(p.type == _USER_DEFINED for p in proto.pieces):
        problems.append("user-defined pieces")
    if problems:
        raise ConfigError(f"the sentencepiece model {sp_path} uses {', '.join(problems)}, which the HF tokenizer "
                          "conversion does not reproduce exactly; export without a tokenizer (--no-tokenizer) and "
                          "ship the .model file instead")


def bpe_merges(proto) -> list[tuple[str, str]]:
    """Every (left, right) pair of vocabulary pieces whose concatenation is a normal piece, highest score first."""
    ids = {p.piece: i for i, p in enumerate(proto.pieces)}
    ranked = []
    for i, p in enumerate(proto.pieces):
        if p.type != _NORMAL:
            continue
        for cut in range(1, len(p.piece)):
            left, right = p.piece[:cut], p.piece[cut:]
            if left in ids and right in ids:
                ranked.append((-p.score, i, ids[left], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def build_hf_tokenizer(sp_path: str | Path, add_bos: bool):
    """A `tokenizers.Tokenizer` equal to the sentencepiece model at sp_path (see the module docstring)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    proto = _load_proto(Path(sp_path))
    _check_supported(proto, Path(sp_path))
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    unk = proto.pieces[proto.trainer_spec.unk_id].piece
    tok = Tokenizer(models.BPE(vocab=vocab, merges=bpe_merges(proto), unk_token=unk, fuse_unk=True,
                               byte_fallback=proto.trainer_spec.byte_fallback))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = [p.piece for p in proto.pieces if p.type in (_UNKNOWN, _CONTROL)]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    bos_id = proto.trainer_spec.bos_id
    if add_bos and bos_id >= 0:
        bos = proto.pieces[bos_id].piece
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, bos_id)])
    tok.encode_special_tokens = True
    return tok


def write_hf_tokenizer(sp_path: str | Path, out_dir: Path, add_bos: bool, max_length: int) -> list[Path]:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json and a copy of the sentencepiece
    model (tokenizer.model) into out_dir; `AutoTokenizer.from_pretrained(out_dir)` then loads it."""
    proto = _load_proto(Path(sp_path))
    tok = build_hf_tokenizer(sp_path, add_bos)
    spec = proto.trainer_spec

    def piece(i: int) -> str | None:
        return proto.pieces[i].piece if i >= 0 else None

    special = {"bos_token": piece(spec.bos_id), "eos_token": piece(spec.eos_id), "unk_token": piece(spec.unk_id)}
    special = {k: v for k, v in special.items() if v is not None}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "tokenizer.json", out_dir / "tokenizer_config.json", out_dir / "special_tokens_map.json",
             out_dir / "tokenizer.model"]
    tok.save(str(paths[0]))
    paths[1].write_text(json.dumps(config, indent=2) + "\n")
    paths[2].write_text(json.dumps(special, indent=2) + "\n")
    shutil.copyfile(sp_path, paths[3])
    return paths
