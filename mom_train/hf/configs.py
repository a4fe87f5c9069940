"""Our model config <-> the `config.json` of a Hugging Face checkpoint, in two formats:

- "fla": flash-linear-attention's classes, registered with transformers' Auto classes by `import fla`:
  `MomForCausalLM` (model_type "mom"), `GatedDeltaNetForCausalLM` ("gated_deltanet") and
  `TransformerForCausalLM` ("transformer", which needs flash-attn to build);
- "llama": transformers' own `LlamaForCausalLM` ("llama"), which Transformer++ maps onto exactly.

The dicts are written and read as plain JSON, so neither transformers nor fla is needed to export or import.
Options of the HF classes that our model cannot express are refused on import with the field and its value.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from mom_train.config import ConfigError, ModelConfig, mlp_intermediate_size

FORMATS = ("fla", "llama")
# config.json model_type -> (our arch, format)
MODEL_TYPES = {"mom": ("mom", "fla"), "gated_deltanet": ("gated_deltanet", "fla"),
               "transformer": ("transformer", "fla"), "llama": ("transformer", "llama")}
ARCHITECTURES = {"mom": "MomForCausalLM", "gated_deltanet": "GatedDeltaNetForCausalLM",
                 "transformer": "TransformerForCausalLM", "llama": "LlamaForCausalLM"}


def default_format(arch: str) -> str:
    """Transformer++ exports as Llama (loads without fla or flash-attn); the recurrent models as fla."""
    return "llama" if arch == "transformer" else "fla"


def check_format(cfg: ModelConfig, fmt: str) -> None:
    """Raise ConfigError when `cfg` has no exact counterpart in format `fmt`."""
    if fmt not in FORMATS:
        raise ConfigError(f"export format {fmt!r} is unknown; choose one of {', '.join(FORMATS)}")
    if fmt == "llama" and cfg.arch != "transformer":
        raise ConfigError(f"--format llama holds Transformer++ models only, this one is model.arch={cfg.arch!r}; "
                          "export it with --format fla (flash-linear-attention's classes)")
    if fmt == "fla" and cfg.arch != "transformer" and not cfg.use_short_conv:
        raise ConfigError(f"fla's {cfg.arch} layer cannot be built without short convolutions, and this model has "
                          "model.use_short_conv=false; it has no fla counterpart")


def _whole(x: float) -> int | float:
    """2.0 -> 2 (HF configs type hidden_ratio as an int), 2.5 stays."""
    return int(x) if float(x).is_integer() else x


def hf_config(cfg: ModelConfig, fmt: str, max_position_embeddings: int, bos_token_id: int | None,
              eos_token_id: int | None, dtype: str = "float32") -> dict[str, Any]:
    """The config.json of `cfg` exported in format `fmt` (see `check_format`)."""
    check_format(cfg, fmt)
    intermediate = mlp_intermediate_size(cfg.hidden_size, cfg.hidden_ratio, cfg.intermediate_size)
    model_type = "llama" if fmt == "llama" else cfg.arch
    common = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "intermediate_size": intermediate,
        "max_position_embeddings": max_position_embeddings,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": None,
        "use_cache": True,
        # transformers 5 reads dtype, 4.x torch_dtype
        "dtype": dtype,
        "torch_dtype": dtype,
    }
    if fmt == "llama":
        return {**common, "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_heads,
                "head_dim": cfg.head_dim, "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
                "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
                "rope_scaling": None, "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
                "pretraining_tp": 1}
    fla = {**common, "hidden_ratio": _whole(cfg.hidden_ratio), "hidden_act": "swish", "norm_eps": cfg.norm_eps,
           "fuse_norm": True, "fuse_swiglu": True, "fuse_cross_entropy": True, "attnres_block_size": None}
    if cfg.arch == "transformer":
        return {**fla, "num_heads": cfg.num_heads, "num_kv_heads": None, "qkv_bias": False, "qk_norm": False,
                "window_size": None, "rope_theta": cfg.rope_theta, "elementwise_affine": True}
    recurrent = {**fla, "attn_mode": "chunk", "attn": None, "num_heads": cfg.num_heads, "head_dim": cfg.head_dim,
                 "expand_v": cfg.expand_v, "use_short_conv": True, "conv_size": cfg.conv_size}
    if cfg.arch == "gated_deltanet":
        return {**recurrent, "use_gate": True, "allow_neg_eigval": False, "num_v_heads": None,
                "output_gate_activation": "swish"}
    return {**recurrent, "use_output_gate": True, "num_memories": cfg.num_memories, "topk": cfg.topk,
            "shared_mem": cfg.shared_memory, "single_kv_proj": False, "mom_backend": "gated_deltanet",
            "aux_loss_scale": cfg.aux_loss_coef, "capacity": 1.0, "use_layer_wise_balance": True}


class _Reader:
    """Fields of one config.json with the HF classes' defaults, refusing values our model cannot express."""

    def __init__(self, hf: dict[str, Any], where: str):
        self.hf, self.where = hf, where

    def get(self, key: str, default: Any = None) -> Any:
        value = self.hf.get(key, default)
        return default if value is None else value

    def need(self, key: str) -> Any:
        """A field without a default."""
        if self.hf.get(key) is None:
            raise ConfigError(f"{self.where} lacks {key}; it is not a complete {self.hf.get('model_type')} config")
        return self.hf[key]

    def require(self, key: str, allowed: tuple, default: Any = None, why: str = "") -> None:
        value = self.hf.get(key, default)
        if value not in allowed:
            raise ConfigError(f"{self.where}: {key} = {value!r} has no counterpart in our models (supported: "
                              f"{', '.join(map(repr, allowed))}){'; ' + why if why else ''}")


def model_config_from_hf(hf: dict[str, Any], where: str = "config.json") -> tuple[dict[str, Any], str]:
    """(ModelConfig fields, format) of a config.json; raises ConfigError naming any unsupported option."""
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"{where}: model_type {model_type!r} is not one we import; supported: "
                          f"{', '.join(MODEL_TYPES)} (fla's MoM, Gated DeltaNet, Transformer and transformers' Llama)")
    arch, fmt = MODEL_TYPES[model_type]
    r = _Reader(hf, where)
    fields: dict[str, Any] = {
        "arch": arch,
        "hidden_size": r.need("hidden_size"),
        "num_layers": r.need("num_hidden_layers"),
        "vocab_size": r.get("vocab_size", 32000),
        # HF classes default to untied heads
        "tie_embeddings": bool(r.get("tie_word_embeddings", False)),
        "init_std": r.get("initializer_range", 0.02),
    }
    if fmt == "llama":
        _llama_fields(r, fields)
    else:
        r.require("attnres_block_size", (None,), why="attention-residual blocks are not part of our models")
        r.require("hidden_act", ("swish", "silu"), default="swish")
        fields["norm_eps"] = r.get("norm_eps", 1e-6)
        fields["hidden_ratio"] = float(r.get("hidden_ratio", 4))
        fields["intermediate_size"] = r.get("intermediate_size")
        if arch == "transformer":
            _fla_transformer_fields(r, fields)
        else:
            _recurrent_fields(r, fields, arch)
    ratio = fields.get("hidden_ratio")
    if ratio is not None and fields["intermediate_size"] == mlp_intermediate_size(fields["hidden_size"], ratio):
        # the width hidden_ratio gives anyway: keep the config as our runs write it
        fields["intermediate_size"] = None
    return fields, fmt


def _llama_fields(r: _Reader, fields: dict[str, Any]) -> None:
    heads = r.need("num_attention_heads")
    r.require("num_key_value_heads", (heads, None), why="grouped-query attention is not part of model.arch=transformer")
    r.require("hidden_act", ("silu",), default="silu")
    r.require("attention_bias", (False,), default=False)
    r.require("mlp_bias", (False,), default=False)
    rope = r.get("rope_parameters") or r.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ConfigError(f"{r.where}: rope type {rope.get('rope_type', rope.get('type'))!r} is not supported; "
                          "model.arch=transformer uses plain RoPE (rope_type 'default')")
    fields.update(num_heads=heads, head_dim=r.get("head_dim", r.get("hidden_size") // heads),
                  intermediate_size=r.need("intermediate_size"), norm_eps=r.get("rms_norm_eps", 1e-6),
                  rope_theta=float(rope.get("rope_theta", r.get("rope_theta", 10000.0))))


def _fla_transformer_fields(r: _Reader, fields: dict[str, Any]) -> None:
    heads = r.need("num_heads")
    r.require("num_kv_heads", (heads, None), why="grouped-query attention is not part of model.arch=transformer")
    r.require("qkv_bias", (False,), default=False)
    r.require("qk_norm", (False,), default=False)
    r.require("window_size", (None,), why="sliding-window attention is not part of model.arch=transformer")
    r.require("elementwise_affine", (True, None), default=True)
    fields.update(num_heads=heads, head_dim=r.get("hidden_size") // heads,
                  rope_theta=float(r.get("rope_theta", 10000.0)))


def _recurrent_fields(r: _Reader, fields: dict[str, Any], arch: str) -> None:
    r.require("attn", (None,), why="hybrid models with softmax-attention layers are not part of our models")
    r.require("use_short_conv", (True,), default=True)
    fields.update(num_heads=r.need("num_heads"), head_dim=r.get("head_dim", 256),
                  expand_v=float(r.get("expand_v", 1.0 if arch == "mom" else 2.0)), use_short_conv=True,
                  conv_size=r.get("conv_size", 4))
    if arch == "gated_deltanet":
        r.require("use_gate", (True,), default=True)
        r.require("allow_neg_eigval", (False,), default=False)
        r.require("num_v_heads", (None, fields["num_heads"]))
        r.require("output_gate_activation", ("swish", "silu"), default="swish")
        return
    r.require("use_output_gate", (True,), default=True)
    r.require("single_kv_proj", (False,), default=False)
    r.require("mom_backend", ("gated_deltanet",), default="gated_deltanet")
    fields.update(num_memories=r.get("num_memories", 4), topk=r.get("topk", 2),
                  shared_memory=bool(r.get("shared_mem", True)), aux_loss_coef=r.get("aux_loss_scale", 0.01))


def model_config(fields: dict[str, Any], base: ModelConfig | None = None) -> ModelConfig:
    """`base` (runtime settings such as kernel_backend) with the architecture fields of an imported model."""
    return dataclasses.replace(base or ModelConfig(), **fields)
