"""`mom-train export`: a checkpoint of ours -> a Hugging Face checkpoint directory.

    out/config.json             fla's MomConfig / GatedDeltaNetConfig / TransformerConfig, or LlamaConfig
        generation_config.json  bos / eos ids
        model.safetensors       weights (or shards + model.safetensors.index.json), names of the format
        tokenizer.json ...      text models: a tokenizer encoding exactly like the run's sentencepiece model
        README.md               how to load it
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from mom_train.checkpoint import checkpoint_config, load_main, resolve_checkpoint
from mom_train.config import Config, ConfigError
from mom_train.data.mqar import BOS_ID as MQAR_BOS_ID
from mom_train.hf.configs import check_format, default_format, hf_config
from mom_train.hf.files import INDEX, MAX_SHARD_BYTES, SINGLE, write_weights
from mom_train.hf.weights import to_hf

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, fmt: str | None = None,
                      dtype: str = "float32", tokenizer: bool = True, overrides: list[str] | tuple[str, ...] = (),
                      max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Export a checkpoint (a step directory or a run directory: its latest) into directory `out`.

    fmt: "fla" or "llama" (default: llama for Transformer++, fla otherwise); dtype: of the written weights;
    tokenizer: write the HF tokenizer of a text run (MQAR runs have none)."""
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    path = resolve_checkpoint(checkpoint)
    cfg = checkpoint_config(path, overrides)
    fmt = fmt or default_format(cfg.model.arch)
    check_format(cfg.model, fmt)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _remove_stale_weights(out)
    sp_path = None
    bos, eos = MQAR_BOS_ID, None
    if cfg.data.source != "mqar":
        from mom_train.data import load_tokenizer

        sp = load_tokenizer(cfg.data.tokenizer)
        sp_path, bos, eos = sp.path, sp.bos_id, sp.eos_id
    config = hf_config(cfg.model, fmt, cfg.training.seq_len, bos, eos, dtype)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": bos, "eos_token_id": eos}, indent=2)
                                                + "\n")
    write_weights(to_hf(load_main(path, "model"), cfg.model, fmt, DTYPES[dtype]), out, max_shard_bytes)
    if tokenizer and sp_path is not None:
        from mom_train.hf.tokenizer import write_hf_tokenizer

        write_hf_tokenizer(sp_path, out, cfg.data.add_bos, cfg.training.seq_len)
    (out / "README.md").write_text(model_card(cfg, fmt, path))
    return out


def _remove_stale_weights(out: Path) -> None:
    """Weight files of an earlier export into the same directory (a sharded one would shadow a single file)."""
    for stale in [out / SINGLE, out / INDEX, *out.glob("model-*-of-*.safetensors")]:
        if stale.is_file():
            stale.unlink()


def model_card(cfg: Config, fmt: str, checkpoint: Path) -> str:
    """A short README.md for the hub: what the model is and how to load it."""
    m = cfg.model
    load = ("from transformers import AutoModelForCausalLM, AutoTokenizer\n" if fmt == "llama" else
            "import fla  # registers fla's model classes with transformers' Auto classes\n"
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n")
    what = {"mom": f"Mixture-of-Memories ({m.num_memories} memories, top-{m.topk}"
                   f"{', shared memory' if m.shared_memory else ''})",
            "gated_deltanet": "Gated DeltaNet", "transformer": "Transformer++ (RoPE, SwiGLU)"}[m.arch]
    return (f"# {cfg.run.name}\n\n"
            f"{what} language model, {m.num_layers} layers, hidden size {m.hidden_size}, trained with mom_train "
            f"(exported from {checkpoint.name}).\n\n"
            "```python\n"
            f"{load}"
            "model = AutoModelForCausalLM.from_pretrained(PATH)\n"
            "tokenizer = AutoTokenizer.from_pretrained(PATH)\n"
            "```\n")
