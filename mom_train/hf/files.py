"""Safetensors weights of a Hugging Face checkpoint directory: one `model.safetensors`, or shards
`model-0000i-of-0000n.safetensors` named by `model.safetensors.index.json` (transformers' layout)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from mom_train.config import ConfigError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
# transformers' default largest shard
MAX_SHARD_BYTES = 5 * 10 ** 9


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise ConfigError("Hugging Face checkpoints need the safetensors package: pip install safetensors "
                          "(or pip install -e '.[hf]')") from None
    return safetensors.torch


def write_weights(tensors: dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int = MAX_SHARD_BYTES,
                  ) -> list[Path]:
    """Write tensors (contiguous, unshared) into out_dir in shards of at most max_shard_bytes (a tensor larger
    than that gets a shard of its own); return the files written."""
    st = _safetensors()
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        st.save_file(shards[0], str(out_dir / SINGLE), metadata={"format": "pt"})
        return [out_dir / SINGLE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file, shard in zip(names, shards):
        st.save_file(shard, str(out_dir / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out_dir / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                            indent=2) + "\n")
    return [out_dir / n for n in names] + [out_dir / INDEX]


def read_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory (single file or sharded), on the CPU."""
    st = _safetensors()
    if (hf_dir / SINGLE).is_file():
        return st.load_file(str(hf_dir / SINGLE))
    if (hf_dir / INDEX).is_file():
        weight_map = json.loads((hf_dir / INDEX).read_text())["weight_map"]
        out: dict[str, torch.Tensor] = {}
        for file in sorted(set(weight_map.values())):
            out.update(st.load_file(str(hf_dir / file)))
        return out
    found = sorted(p.name for p in hf_dir.glob("*.bin")) if hf_dir.is_dir() else []
    hint = (f"; it holds {found[:3]}: convert pickled .bin weights to safetensors first (e.g. load and "
            "save_pretrained(..., safe_serialization=True) with transformers)") if found else ""
    raise ConfigError(f"no {SINGLE} or {INDEX} in {hf_dir}{hint}")
