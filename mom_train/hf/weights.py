"""Our state dict <-> the tensors of a Hugging Face checkpoint (fla or Llama names); exact, no arithmetic.

fla (MomForCausalLM, GatedDeltaNetForCausalLM, TransformerForCausalLM):
    embed.weight                          model.embeddings.weight
    layers.i.{attn_norm,mlp_norm}.weight  model.layers.i.{attn_norm,mlp_norm}.weight
    layers.i.mlp.*                        model.layers.i.mlp.*
    layers.i.mixer.*                      model.layers.i.attn.*   (q/k/v/a/b/g/o_proj, A_log, dt_bias, o_norm)
    layers.i.mixer.{q,k,v}_conv1d [C, W]  model.layers.i.attn.{q,k,v}_conv1d.weight [C, 1, W]
    norm.weight, lm_head.weight           model.norm.weight, lm_head.weight (absent when tied)
  MoM, S = E streams (+1 shared, last), key_dim D' = H * dk:
    mixer.router.weight [E, D]                      attn.gate.weight
    mixer.memory_kv_proj [S, D' + H*dv, D]          attn.k_proj.e.weight = [e, :D'], attn.v_proj.e.weight = [e, D':]
                                                    (e < E), attn.shared_k / shared_v = the last slot
    mixer.memory_ba_proj [S, 2H, D]                 attn.b_proj.e.weight = [e, :H], attn.a_proj.e.weight = [e, H:],
                                                    attn.shared_b / shared_a = the last slot
Llama (transformers' LlamaForCausalLM): embed_tokens, layers.i.self_attn.{q,k,v,o}_proj,
input_layernorm (our attn_norm), post_attention_layernorm (our mlp_norm), mlp, norm, lm_head.
"""
from __future__ import annotations

import re
from collections.abc import Callable

import torch

from mom_train.config import ConfigError, ModelConfig
from mom_train.model import build_model

_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_CONV = re.compile(r"^mixer\.([qkv])_conv1d\.weight$")


def _block_name(rest: str, fmt: str) -> str:
    """A block tensor's name below `model.layers.i.` (everything but the MoM stacks and the convs)."""
    if fmt == "llama":
        renames = {"attn_norm.weight": "input_layernorm.weight", "mlp_norm.weight": "post_attention_layernorm.weight"}
        if rest in renames:
            return renames[rest]
        return re.sub(r"^mixer\.", "self_attn.", rest)
    return re.sub(r"^mixer\.", "attn.", re.sub(r"^mixer\.router\.", "mixer.gate.", rest))


def hf_name(name: str, fmt: str) -> str:
    """The HF name of one of our tensors that maps one-to-one (see the module docstring)."""
    top = {"embed.weight": "model.embed_tokens.weight" if fmt == "llama" else "model.embeddings.weight",
           "norm.weight": "model.norm.weight", "lm_head.weight": "lm_head.weight"}
    if name in top:
        return top[name]
    m = _LAYER.match(name)
    if m is None:
        raise ValueError(f"no HF name for tensor {name!r}")
    return f"model.layers.{m.group(1)}.{_block_name(m.group(2), fmt)}"


def _stream_names(prefix: str, kind: str, num_memories: int, shared: bool) -> list[str]:
    """fla's names of one projection ("k", "v", "b", "a") for every stream, shared memory last."""
    names = [f"{prefix}.{kind}_proj.{e}.weight" for e in range(num_memories)]
    return names + [f"{prefix}.shared_{kind}.weight"] if shared else names


def _stack_parts(name: str, cfg: ModelConfig) -> tuple[list[str], list[str], int] | None:
    """For a MoM stack: (first-half names, second-half names, split row) per stream; None for other tensors."""
    m = _LAYER.match(name)
    if m is None or cfg.arch != "mom":
        return None
    prefix = f"model.layers.{m.group(1)}.attn"
    E, shared = cfg.num_memories, cfg.shared_memory
    if m.group(2) == "mixer.memory_kv_proj":
        key_dim = cfg.num_heads * cfg.head_dim
        return _stream_names(prefix, "k", E, shared), _stream_names(prefix, "v", E, shared), key_dim
    if m.group(2) == "mixer.memory_ba_proj":
        return _stream_names(prefix, "b", E, shared), _stream_names(prefix, "a", E, shared), cfg.num_heads
    return None


def to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig, fmt: str,
          dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Our state dict (every parameter of `build_model(cfg)`) -> HF tensors, contiguous and unshared, in
    `dtype` (default: as stored). A tied head is left out, as HF checkpoints of tied models do."""
    out: dict[str, torch.Tensor] = {}

    def put(hf: str, tensor: torch.Tensor) -> None:
        out[hf] = tensor.to(dtype or tensor.dtype).contiguous().clone()

    for name, tensor in state.items():
        parts = _stack_parts(name, cfg)
        if parts is not None:
            first, second, split = parts
            # [S, rows, D]: stream s's first `split` rows and the rest
            for s in range(tensor.shape[0]):
                put(first[s], tensor[s, :split])
                put(second[s], tensor[s, split:])
            continue
        m = _LAYER.match(name)
        if fmt == "fla" and m is not None and _CONV.match(m.group(2)):
            # [C, W] -> nn.Conv1d's depthwise [C, 1, W]
            put(hf_name(name, fmt), tensor.unsqueeze(1))
            continue
        put(hf_name(name, fmt), tensor)
    return out


def from_hf(tensors: dict[str, torch.Tensor], cfg: ModelConfig, fmt: str,
            where: str = "the checkpoint") -> dict[str, torch.Tensor]:
    """HF tensors -> our state dict for `build_model(cfg)`, strictly: every tensor of ours is found with its
    shape, and every HF tensor is used (a tied head may be present if it equals the embedding)."""
    remaining = dict(tensors)

    def take(hf: str) -> torch.Tensor:
        if hf not in remaining:
            raise ConfigError(f"{where} lacks tensor {hf!r}, which our {cfg.arch} model needs; is it a checkpoint "
                              "of the architecture its config.json names?")
        return remaining.pop(hf)

    with torch.device("meta"):
        expected = build_model(cfg).state_dict()
    state: dict[str, torch.Tensor] = {}
    for name, like in expected.items():
        state[name] = _gather(name, cfg, fmt, take)
        if state[name].shape != like.shape:
            raise ConfigError(f"{where}: tensor for {name} has shape {tuple(state[name].shape)}, our model built "
                              f"from config.json expects {tuple(like.shape)}")
    head = remaining.pop("lm_head.weight", None)
    if head is not None and not torch.equal(head, state["embed.weight"]):
        raise ConfigError(f"{where} holds an lm_head.weight that differs from the embedding, but config.json says "
                          "tie_word_embeddings=true; set it to false to keep a separate head")
    if remaining:
        names = sorted(remaining)
        raise ConfigError(f"{where} holds {len(names)} tensor(s) our {cfg.arch} model has no place for, e.g. "
                          f"{names[:5]}; config.json may describe another architecture or options we do not support")
    return state


def _gather(name: str, cfg: ModelConfig, fmt: str, take: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """One of our tensors from its HF parts (the inverse of `to_hf` for that tensor)."""
    parts = _stack_parts(name, cfg)
    if parts is not None:
        first, second, _ = parts
        return torch.stack([torch.cat((take(a), take(b)), 0) for a, b in zip(first, second)])
    m = _LAYER.match(name)
    if fmt == "fla" and m is not None and _CONV.match(m.group(2)):
        # [C, 1, W] -> [C, W]
        return take(hf_name(name, fmt)).squeeze(1)
    return take(hf_name(name, fmt))
