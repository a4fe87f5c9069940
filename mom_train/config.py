"""Typed experiment configuration: the dataclass schema is the source of truth, YAML files are instances.

    cfg = load_config("configs/mom_340m.yaml", ["training.lr=1e-3", "run.name=try2"])

A YAML file may name another with `base: other.yaml` (relative to itself); the child's keys are deep-merged
over the base. Overrides are `section.key=value` (nested: `data.mqar.num_pairs=16`), parsed to the field's
type. Every problem is a `ConfigError` that names the key, the bad value and what is expected.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config problem a user can fix; the CLI prints it without a traceback and exits 2."""


def _range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, default: Any = None,
           factory: Any = None) -> Any:
    """A dataclass field with an allowed numeric range, checked by `validate`."""
    meta = {"lo": lo, "hi": hi, "lo_open": lo_open}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunConfig:
    name: str = "run"
    # outputs go to <dir>/<name>/: config.yaml, metrics.jsonl, checkpoints/
    dir: str = "runs"
    seed: int = 42
    # auto: cuda when available, else cpu
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @property
    def path(self) -> Path:
        return Path(self.dir) / self.name


@dataclass
class ModelConfig:
    arch: Literal["mom", "gated_deltanet", "transformer"] = "mom"
    hidden_size: int = _range(1, default=1024)
    num_layers: int = _range(1, default=24)
    num_heads: int = _range(1, default=4)
    head_dim: int = _range(1, default=256)
    # value head dim = head_dim * expand_v (gated deltanet / mom)
    expand_v: float = _range(0, lo_open=True, default=1.0)
    num_memories: int = _range(1, default=4)
    topk: int = _range(1, default=2)
    shared_memory: bool = True
    aux_loss_coef: float = _range(0, default=0.01)
    # mlp intermediate = hidden_size * hidden_ratio * 2/3, rounded up to a multiple of 256
    hidden_ratio: float = _range(0, lo_open=True, default=4.0)
    intermediate_size: int | None = _range(1, default=None)
    use_short_conv: bool = True
    conv_size: int = _range(1, default=4)
    vocab_size: int = _range(1, default=32000)
    tie_embeddings: bool = True
    norm_eps: float = _range(0, lo_open=True, default=1e-6)
    init_std: float = _range(0, lo_open=True, default=0.02)
    # transformer baseline only
    rope_theta: float = _range(0, lo_open=True, default=10000.0)
    kernel_backend: Literal["auto", "triton", "torch"] = "auto"
    # mom token mixer implementation: fused varlen buffer (fast) or per-memory loop (reference)
    mom_impl: Literal["fast", "reference"] = "fast"
    # fast path's k/v projections: one GEMM over every (token, stream) then a gather (dense), or a grouped GEMM
    # over each stream's rows of the buffer (grouped: 3/5 of the FLOPs for top-2 of 4 + shared; torch's grouped
    # GEMM kernel needs Hopper and bf16); auto: grouped for bf16 on GPUs of compute capability >= 9.0, else dense
    mom_projection: Literal["auto", "dense", "grouped"] = "auto"


def mlp_intermediate_size(hidden_size: int, hidden_ratio: float, intermediate_size: int | None = None) -> int:
    """hidden * hidden_ratio * 2/3 rounded up to a multiple of 256, unless given explicitly."""
    if intermediate_size is not None:
        return intermediate_size
    # int() first, then round up: 1024 * 4 * 2/3 = 2730.67 -> 2730 -> 2816
    size = int(hidden_size * hidden_ratio * 2 / 3)
    return 256 * math.ceil(size / 256)


@dataclass
class MQARConfig:
    """Synthetic multi-query associative recall (Zoology-style)."""
    num_pairs: int = _range(1, default=8)
    num_queries: int = _range(1, default=8)
    # symbols: keys and values are drawn from disjoint halves of the non-special vocabulary
    vocab_size: int = _range(8, default=256)


@dataclass
class DataConfig:
    source: Literal["mqar", "slimpajama", "files"] = "mqar"
    # slimpajama: local mirror root (train/chunkN/*.jsonl.zst) or None to stream from the hub; files: a glob
    path: str | None = None
    # held-out data for evaluation (same layout as `path`); slimpajama defaults to its validation split
    eval_path: str | None = None
    text_field: str = "text"
    # "mistral-v1" (shipped with mistral-common) or a path to a sentencepiece .model
    tokenizer: str = "mistral-v1"
    add_bos: bool = True
    add_eos: bool = False
    # slimpajama: sampling weight per meta.redpajama_set_name, e.g. {RedPajamaArXiv: 0.5}
    subset_weights: dict[str, float] | None = None
    shuffle_buffer: int = _range(0, default=1024)
    num_workers: int = _range(0, default=1)
    prefetch: int = _range(0, default=4)
    mqar: MQARConfig = field(default_factory=MQARConfig)


@dataclass
class TrainingConfig:
    lr: float = _range(0, lo_open=True, default=3e-4)
    min_lr_ratio: float = _range(0, 1, default=0.1)
    warmup_steps: int = _range(0, default=1024)
    steps: int = _range(1, default=30000)
    # global batch: give exactly one of tokens or sequences; grad accumulation is derived from it
    global_batch_tokens: int | None = _range(1, default=None)
    global_batch_size: int | None = _range(1, default=None)
    micro_batch_size: int = _range(1, default=8)
    seq_len: int = _range(1, default=2048)
    weight_decay: float = _range(0, default=0.01)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = _range(0, lo_open=True, default=1e-8)
    grad_clip: float = _range(0, default=1.0)
    # auto: bf16 autocast on GPU, fp32 on CPU
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    # what a NaN/inf loss or gradient does: skip the update, or save a checkpoint and stop
    nan_policy: Literal["skip", "stop"] = "stop"
    # replay each micro-batch's forward + backward from a CUDA graph (one per power-of-two document-count
    # bucket, captured on first use): removes the per-kernel launch cost; needs CUDA and a sync-free model
    cuda_graphs: bool = False
    # recompute each block's forward in backward instead of keeping its activations (less memory, ~1/3 more
    # compute)
    activation_checkpointing: bool = False


@dataclass
class ParallelConfig:
    # tensor parallelism: heads and the MLP split over tp ranks of one node (innermost in the rank layout)
    tp: int = _range(1, default=1)
    # with tp > 1: residual stream, norms and loss sharded along the sequence (Megatron sequence parallelism)
    sequence_parallel: bool = True
    # context parallelism: each packed sequence split over cp ranks, recurrent states passed between them
    cp: int = _range(1, default=1)
    # ZeRO over the dp x cp ranks: 1 optimizer state, 2 + gradients (reduce-scatter), 3 + parameters (DeepSpeed)
    zero_stage: int = _range(0, 3, default=0)
    # native: our step engine (stages 0-2, CUDA graphs); deepspeed: DeepSpeed's (any stage); auto: DeepSpeed for
    # stage 3, else native
    engine: Literal["auto", "native", "deepspeed"] = "auto"
    # a DeepSpeed JSON merged under the run's settings (the YAML wins; each conflict is reported)
    deepspeed_config: str | None = None

    @property
    def uses_deepspeed(self) -> bool:
        return self.engine == "deepspeed" or (self.engine == "auto" and self.zero_stage == 3)


@dataclass
class CheckpointConfig:
    # steps between checkpoints (0: only at the end and on preemption)
    interval: int = _range(0, default=1000)
    keep: int = _range(1, default=3)
    # auto: newest checkpoint of this run if any; none: start fresh; otherwise a checkpoint directory
    resume: str = "auto"


@dataclass
class LoggingConfig:
    interval: int = _range(1, default=10)
    wandb: Literal["disabled", "offline", "online"] = "disabled"
    wandb_project: str = "mom_train"
    progress_bar: bool = True


@dataclass
class EvalConfig:
    # steps between evaluations (0: never during training)
    interval: int = _range(0, default=1000)
    num_batches: int = _range(1, default=20)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def dump(self, path: str | os.PathLike) -> None:
        """Write the resolved config as YAML (atomically); `load_config` reads it back to an equal Config."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(to_yaml(self))
        os.replace(tmp, path)

    def global_batch_sequences(self, dp_size: int = 1) -> int:
        t = self.training
        if t.global_batch_size is not None:
            return t.global_batch_size
        if t.global_batch_tokens is not None:
            return t.global_batch_tokens // t.seq_len
        return t.micro_batch_size * dp_size

    def grad_accum_steps(self, dp_size: int = 1) -> int:
        """Micro-batches per rank per optimizer step, derived from the global batch."""
        return self.global_batch_sequences(dp_size) // (self.training.micro_batch_size * dp_size)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=False)


# ---------------------------------------------------------------------------------------------- loading


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read one YAML file and resolve its `base:` chain into one merged dict."""
    if not path.exists():
        raise ConfigError(f"config file not found: {path} (check the path given to --config or to `base:`)")
    if path.is_dir():
        raise ConfigError(f"config path is a directory, not a YAML file: {path}")
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    base_path = (path.parent / str(base)).resolve()
    if base_path in chain + (path.resolve(),):
        loop = chain + (path.resolve(), base_path)
        raise ConfigError(f"config inheritance loops: {' -> '.join(map(str, loop))}; remove one of these `base:` "
                          "lines")
    return _deep_merge(_read_yaml(base_path, chain + (path.resolve(),)), data)


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        k, v = typing.get_args(tp)
        return f"a mapping of {_type_name(k)} to {_type_name(v)}"
    return {int: "an integer", float: "a float", str: "a string", bool: "a boolean (true/false)"}.get(
        tp, getattr(tp, "__name__", str(tp)))


_NO = object()


def _coerce(value: Any, tp: Any) -> Any:
    """Convert `value` to type `tp` or return _NO."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return value if value in typing.get_args(tp) else _NO
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        for arg in typing.get_args(tp):
            if arg is type(None):
                continue
            out = _coerce(value, arg)
            if out is not _NO:
                return out
        return _NO
    if origin is list:
        if not isinstance(value, (list, tuple)):
            return _NO
        (item_tp,) = typing.get_args(tp)
        items = [_coerce(v, item_tp) for v in value]
        return _NO if any(i is _NO for i in items) else items
    if origin is dict:
        if not isinstance(value, dict):
            return _NO
        ktp, vtp = typing.get_args(tp)
        out = {_coerce(k, ktp): _coerce(v, vtp) for k, v in value.items()}
        return _NO if any(k is _NO or v is _NO for k, v in out.items()) else out
    if tp is bool:
        return value if isinstance(value, bool) else _NO
    if tp is int:
        if isinstance(value, bool):
            return _NO
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return _NO
    if tp is float:
        if isinstance(value, bool):
            return _NO
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            # yaml 1.1 reads "1e-3" as a string; accept it
            try:
                return float(value)
            except ValueError:
                return _NO
        return _NO
    if tp is str:
        return value if isinstance(value, str) else (str(value) if isinstance(value, (int, float)) else _NO)
    return _NO


def _unknown_key(key: str, where: str, choices: list[str]) -> ConfigError:
    name = f"{where}.{key}" if where else key
    close = difflib.get_close_matches(key, choices, n=1, cutoff=0.5)
    hint = f"; did you mean `{where + '.' if where else ''}{close[0]}`?" if close else ""
    return ConfigError(f"unknown config key `{name}`{hint} (valid keys here: {', '.join(choices)})")


def _build(cls: type, data: Any, where: str) -> Any:
    """Instantiate dataclass `cls` from a dict, recursively, with typed errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"`{where}` must be a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise _unknown_key(str(key), where, list(fields))
        tp = hints[key]
        name = f"{where}.{key}" if where else key
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, name)
            continue
        out = _coerce(value, tp)
        if out is _NO:
            raise ConfigError(f"`{name}` = {value!r} has the wrong type: expected {_type_name(tp)}")
        kwargs[key] = out
    return cls(**kwargs)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value (e.g. training.lr=1e-3)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key; expected section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _apply_override(tree: dict[str, Any], parts: list[str], value: Any, raw_value: str) -> None:
    """Set a dotted key in the raw config tree, checking names against the schema as we go."""
    cls: Any = Config
    node = tree
    for depth, part in enumerate(parts):
        where = ".".join(parts[:depth])
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            raise ConfigError(f"`{where}` is a value, not a section; cannot set `{'.'.join(parts)}`")
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            raise _unknown_key(part, where, names)
        tp = typing.get_type_hints(cls)[part]
        last = depth == len(parts) - 1
        if last:
            if dataclasses.is_dataclass(tp):
                raise ConfigError(f"`{'.'.join(parts)}` is a section; set one of its keys, e.g. "
                                  f"{'.'.join(parts)}.{dataclasses.fields(tp)[0].name}=...")
            # keep strings as typed for str fields (run.name=007 stays "007", not 7)
            takes_str = tp is str or (typing.get_origin(tp) in (typing.Union, types.UnionType)
                                      and str in typing.get_args(tp))
            node[part] = raw_value if takes_str and value is not None else value
            return
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"`{'.'.join(parts[:depth + 1])}` must be a mapping")
        cls = tp


def validate(cfg: Config, world_size: int = 1) -> None:
    """Check ranges and cross-field constraints; raise ConfigError naming the field and the remedy."""
    for section in dataclasses.fields(cfg):
        _check_ranges(getattr(cfg, section.name), section.name)
    name = cfg.run.name
    if not name.strip() or name in (".", "..") or "/" in name or "\\" in name:
        raise ConfigError(f"`run.name` = {name!r} must name one directory under run.dir (not empty, no '/'); "
                          "e.g. run.name=try2")
    m, t, p = cfg.model, cfg.training, cfg.parallel
    if m.topk > m.num_memories:
        raise ConfigError(f"`model.topk` = {m.topk} exceeds `model.num_memories` = {m.num_memories}; "
                          "choose topk <= num_memories")
    if m.num_heads % p.tp:
        raise ConfigError(f"`model.num_heads` = {m.num_heads} is not divisible by `parallel.tp` = {p.tp}; "
                          "tensor parallelism splits heads, so choose tp dividing num_heads")
    if m.arch == "transformer" and m.num_heads * m.head_dim != m.hidden_size:
        raise ConfigError(f"transformer: `model.num_heads` x `model.head_dim` = {m.num_heads * m.head_dim} must "
                          f"equal `model.hidden_size` = {m.hidden_size}")
    if m.arch != "transformer" and m.kernel_backend != "torch" and not 16 <= m.head_dim <= 256:
        raise ConfigError(f"`model.head_dim` = {m.head_dim}: the Triton delta-rule kernels take key head sizes 16 "
                          "to 256; choose one in that range (more heads of a smaller size), or "
                          "model.kernel_backend=torch (slow, for CPU experiments)")
    if m.head_dim * m.expand_v != int(m.head_dim * m.expand_v):
        raise ConfigError(f"`model.head_dim` x `model.expand_v` = {m.head_dim * m.expand_v} must be a whole number")
    if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
        raise ConfigError(f"`training.betas` = {t.betas} must be two numbers in [0, 1), e.g. [0.9, 0.95]")
    if t.global_batch_tokens is not None and t.global_batch_size is not None:
        raise ConfigError("give only one of `training.global_batch_tokens` and `training.global_batch_size`")
    if t.global_batch_tokens is not None and t.global_batch_tokens % t.seq_len:
        raise ConfigError(f"`training.global_batch_tokens` = {t.global_batch_tokens} is not a multiple of "
                          f"`training.seq_len` = {t.seq_len}")
    if world_size % (p.tp * p.cp):
        raise ConfigError(f"world size {world_size} is not divisible by `parallel.tp` x `parallel.cp` = "
                          f"{p.tp * p.cp}; launch a multiple of tp*cp processes")
    dp = world_size // (p.tp * p.cp)
    per_step = t.micro_batch_size * dp
    seqs = cfg.global_batch_sequences(dp)
    if seqs % per_step:
        raise ConfigError(f"global batch of {seqs} sequences is not divisible by `training.micro_batch_size` x "
                          f"data-parallel size = {t.micro_batch_size} x {dp} = {per_step}; adjust "
                          "training.global_batch_tokens/global_batch_size or training.micro_batch_size")
    if p.zero_stage == 3 and p.engine == "native":
        raise ConfigError("`parallel.zero_stage` = 3 (sharded parameters) runs on DeepSpeed; set "
                          "parallel.engine=deepspeed (or auto), or use zero_stage 1 or 2 with the native engine")
    if p.uses_deepspeed and t.cuda_graphs:
        raise ConfigError("`training.cuda_graphs` = true cannot capture DeepSpeed's step (its hooks and "
                          "collectives run on the host); set training.cuda_graphs=false, or use "
                          "parallel.engine=native with parallel.zero_stage 0-2")
    if p.deepspeed_config is not None and not p.uses_deepspeed:
        raise ConfigError(f"`parallel.deepspeed_config` = {p.deepspeed_config!r} is given but the run uses the "
                          "native engine; set parallel.engine=deepspeed (or drop the deepspeed config)")
    if p.tp > 1:
        mlp = mlp_intermediate_size(m.hidden_size, m.hidden_ratio, m.intermediate_size)
        if mlp % p.tp:
            raise ConfigError(f"the MLP width {mlp} is not divisible by `parallel.tp` = {p.tp}; tensor parallelism "
                              "splits it, so set model.intermediate_size to a multiple of parallel.tp")
        if (t.micro_batch_size * t.seq_len) % (p.cp * p.tp):
            raise ConfigError(f"a micro-batch of `training.micro_batch_size` x `training.seq_len` = "
                              f"{t.micro_batch_size} x {t.seq_len} tokens does not split into `parallel.cp` x "
                              f"`parallel.tp` = {p.cp} x {p.tp} equal token shards; choose sizes whose product is a "
                              "multiple of cp * tp")
    if p.cp > 1:
        if m.arch == "transformer":
            raise ConfigError(f"`parallel.cp` = {p.cp} needs a recurrent model (model.arch mom or gated_deltanet): "
                              "attention over a split sequence would need ring attention; set parallel.cp=1")
        if m.arch == "mom" and m.mom_impl == "reference":
            raise ConfigError(f"`parallel.cp` = {p.cp} runs MoM's fast path; set model.mom_impl=fast")
        if t.cuda_graphs:
            raise ConfigError(f"`parallel.cp` = {p.cp} passes states between ranks inside the step, which "
                              "`training.cuda_graphs` does not capture; set training.cuda_graphs=false")
        if (t.micro_batch_size * t.seq_len) % p.cp:
            raise ConfigError(f"a micro-batch of `training.micro_batch_size` x `training.seq_len` = "
                              f"{t.micro_batch_size} x {t.seq_len} tokens does not split into `parallel.cp` = "
                              f"{p.cp} equal parts; choose sizes whose product is a multiple of parallel.cp")
    if t.cuda_graphs and m.arch == "mom" and m.mom_impl == "reference":
        raise ConfigError("`training.cuda_graphs` = true cannot capture `model.mom_impl` = 'reference' (it reads "
                          "document boundaries on the host); use model.mom_impl=fast or training.cuda_graphs=false")
    if t.warmup_steps > t.steps:
        raise ConfigError(f"`training.warmup_steps` = {t.warmup_steps} exceeds `training.steps` = {t.steps}")
    if cfg.data.source in ("files",) and not cfg.data.path:
        raise ConfigError("`data.source` = 'files' needs `data.path` (a glob of jsonl/jsonl.zst/parquet/txt files)")
    if cfg.data.source == "mqar":
        q = cfg.data.mqar
        if q.num_queries > q.num_pairs:
            raise ConfigError(f"`data.mqar.num_queries` = {q.num_queries} exceeds `data.mqar.num_pairs` = "
                              f"{q.num_pairs}; each query asks for a distinct key")
        if m.vocab_size < q.vocab_size:
            raise ConfigError(f"`model.vocab_size` = {m.vocab_size} is smaller than `data.mqar.vocab_size` = "
                              f"{q.vocab_size}; set model.vocab_size >= data.mqar.vocab_size")


def _check_ranges(obj: Any, where: str) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        name = f"{where}.{f.name}"
        if dataclasses.is_dataclass(value):
            _check_ranges(value, name)
            continue
        lo, hi = f.metadata.get("lo"), f.metadata.get("hi")
        if value is None or (lo is None and hi is None):
            continue
        if lo is not None and (value <= lo if f.metadata.get("lo_open") else value < lo):
            op = ">" if f.metadata.get("lo_open") else ">="
            raise ConfigError(f"`{name}` = {value!r} is out of range: expected {op} {lo}")
        if hi is not None and value > hi:
            raise ConfigError(f"`{name}` = {value!r} is out of range: expected <= {hi}")


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = (),
                world_size: int | None = None) -> Config:
    """Load a YAML config (with `base:` inheritance), apply `section.key=value` overrides, validate.

    `world_size` defaults to $WORLD_SIZE (torchrun) or 1 and is used for the batch-divisibility checks.
    """
    tree = _read_yaml(Path(path)) if path is not None else {}
    for item in overrides:
        parts, value = _parse_override(item)
        _apply_override(tree, parts, value, item.split("=", 1)[1])
    cfg = _build(Config, tree, "")
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    validate(cfg, world_size)
    return cfg
