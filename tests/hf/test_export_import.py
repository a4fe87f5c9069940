"""Export to and import from Hugging Face checkpoints: exact round trips, transformers' Llama gives our
Transformer++ logits, the fla format loads strictly into fla's classes (names, shapes, values, parameter counts
at the 340M sizes), imported weights train on with a fresh optimizer, and mistakes are refused by name."""
from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch

import mom_train.train as train_mod
from mom_train.checkpoint import checkpoint_config, is_weights_only, latest_checkpoint, load_model, resolve_checkpoint
from mom_train.cli import main
from mom_train.config import ConfigError, load_config
from mom_train.data import build_loader
from mom_train.hf import export_checkpoint, import_hf
from mom_train.hf.configs import hf_config
from mom_train.hf.files import INDEX, read_weights
from mom_train.hf.weights import to_hf
from mom_train.model import build_model, count_parameters
from tests.hf.helpers import CONFIGS, random_checkpoint, tiny_config

pytest.importorskip("safetensors")
CPU = torch.device("cpu")
RUNTIME = ["model.kernel_backend=torch", "run.device=cpu", "logging.progress_bar=false"]

# (id, arch, format, overrides)
ROUND_TRIPS = [
    ("mom", "mom", "fla", []),
    ("mom-no-shared-untied", "mom", "fla", ["model.shared_memory=false", "model.tie_embeddings=false"]),
    ("gated_deltanet", "gated_deltanet", "fla", []),
    ("transformer-fla", "transformer", "fla", []),
    ("transformer-llama-untied", "transformer", "llama", ["model.tie_embeddings=false"]),
]


def export_and_import(tmp_path, cfg, fmt: str, *export_args: str):
    """Export run cfg with the CLI, import it back into a new run; return (hf dir, imported checkpoint)."""
    hf_dir, run2 = tmp_path / "hf", tmp_path / "imported"
    assert main(["export", "--checkpoint", str(cfg.run.path), "--out", str(hf_dir), "--format", fmt,
                 *export_args]) == 0
    assert main(["import", "--hf", str(hf_dir), "--out", str(run2), "--config", str(CONFIGS / "quickstart.yaml"),
                 *RUNTIME]) == 0
    return hf_dir, resolve_checkpoint(run2)


@pytest.mark.parametrize("arch,fmt,overrides", [c[1:] for c in ROUND_TRIPS], ids=[c[0] for c in ROUND_TRIPS])
def test_export_import_round_trip_is_bit_exact(tmp_path, arch: str, fmt: str, overrides: list[str]):
    cfg = tiny_config(tmp_path / "runs", "run", arch, *overrides)
    original = random_checkpoint(cfg)
    _, imported = export_and_import(tmp_path, cfg, fmt)
    assert is_weights_only(imported)
    cfg2 = checkpoint_config(imported)
    if fmt == "fla":
        # fla's configs carry every architecture field of ours
        assert cfg2.model == cfg.model
    a, b = load_model(original, cfg, CPU), load_model(imported, cfg2, CPU)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert sa[name].dtype == sb[name].dtype == torch.float32 and torch.equal(sa[name], sb[name]), name
    ids = torch.randint(0, cfg.model.vocab_size, (2, 11))
    assert torch.equal(a(ids).logits, b(ids).logits)
    packed, cu = torch.randint(0, cfg.model.vocab_size, (1, 17)), torch.tensor([0, 5, 6, 17], dtype=torch.int32)
    assert torch.equal(a(packed, cu_seqlens=cu).logits, b(packed, cu_seqlens=cu).logits)


def test_bfloat16_export_and_shards(tmp_path):
    cfg = tiny_config(tmp_path / "runs", "run", "mom")
    original = random_checkpoint(cfg)
    # shards of at most 8 KiB: every few tensors a new file
    out = export_checkpoint(cfg.run.path, tmp_path / "hf", dtype="bfloat16", max_shard_bytes=8192)
    index = json.loads((out / INDEX).read_text())
    assert not (out / "model.safetensors").exists() and len(set(index["weight_map"].values())) > 3
    tensors = read_weights(out)
    assert set(tensors) == set(index["weight_map"]) and all(t.dtype == torch.bfloat16 for t in tensors.values())
    imported = import_hf(out, tmp_path / "imported", CONFIGS / "quickstart.yaml", RUNTIME)
    state = torch.load(imported.checkpoint / "model.pt")
    want = load_model(original, cfg, CPU).state_dict()
    for name, tensor in want.items():
        assert state[name].dtype == torch.float32 and torch.equal(state[name], tensor.bfloat16().float()), name
    # a later single-file export into the same directory leaves no stale shards behind
    export_checkpoint(cfg.run.path, out)
    assert (out / "model.safetensors").is_file() and not (out / INDEX).exists() and not list(out.glob("model-*"))


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_llama_export_gives_our_logits_in_transformers(tmp_path, tied: bool):
    transformers = pytest.importorskip("transformers")
    cfg = tiny_config(tmp_path / "runs", "run", "transformer", f"model.tie_embeddings={str(tied).lower()}",
                      "model.rope_theta=500.0")
    checkpoint = random_checkpoint(cfg)
    out = export_checkpoint(cfg.run.path, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs, info = transformers.LlamaForCausalLM.from_pretrained(
            out, output_loading_info=True, dtype=torch.float32, attn_implementation="eager")
    assert not any(info.values()), info
    assert (theirs.lm_head.weight is theirs.model.embed_tokens.weight) == tied
    ours = load_model(checkpoint, cfg, CPU)
    ids = torch.randint(0, cfg.model.vocab_size, (3, 13))
    with torch.no_grad():
        want, got = ours(ids).logits, theirs(ids).logits
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    # greedy decoding on each side's KV cache picks the same tokens
    with torch.no_grad():
        ours_tokens = ours.generate(ids[:1, :5], 6, temperature=0)
        theirs_tokens = theirs.generate(ids[:1, :5], max_new_tokens=6, do_sample=False, min_new_tokens=6,
                                        pad_token_id=0)
    assert torch.equal(ours_tokens, theirs_tokens)


FLA_CLASSES = {"mom": "MomForCausalLM", "gated_deltanet": "GatedDeltaNetForCausalLM",
               "transformer": "TransformerForCausalLM"}


@pytest.fixture
def fla_transformers(monkeypatch):
    """fla (its classes registered with transformers' Auto classes) and transformers. fla's attention layer
    refuses to be built without flash-attn: a stand-in lets it be built here (never called)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fla = pytest.importorskip("fla")
        import fla.layers.attn
    transformers = pytest.importorskip("transformers")
    if fla.layers.attn.flash_attn_func is None:
        monkeypatch.setattr(fla.layers.attn, "flash_attn_func", lambda *a, **k: None)
    return transformers


def _fla_names(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch", list(FLA_CLASSES))
def test_fla_format_loads_strictly_into_fla_classes(tmp_path, arch: str, fla_transformers):
    auto_config, auto_model = fla_transformers.AutoConfig, fla_transformers.AutoModelForCausalLM
    cfg = tiny_config(tmp_path / "runs", "run", arch)
    random_checkpoint(cfg)
    out = export_checkpoint(cfg.run.path, tmp_path / "hf", fmt="fla")
    config = auto_config.from_pretrained(out)
    with torch.device("meta"):
        model = auto_model.from_config(config)
    assert type(model).__name__ == FLA_CLASSES[arch]
    assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg.model)["total"]
    weights = read_weights(out)
    # a tied checkpoint has no head; transformers ties it to the embedding on load
    weights["lm_head.weight"] = weights["model.embeddings.weight"]
    model.load_state_dict(weights, strict=True, assign=True)


def test_fla_mom_values_land_in_fla_modules(tmp_path, fla_transformers):
    """from_pretrained on the CPU: no key left over, and each stream's weights sit in the right module."""
    cfg = tiny_config(tmp_path / "runs", "run", "mom")
    checkpoint = random_checkpoint(cfg)
    out = export_checkpoint(cfg.run.path, tmp_path / "hf", fmt="fla")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, info = fla_transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    ours = load_model(checkpoint, cfg, CPU)
    mixer, attn = ours.layers[1].mixer, model.model.layers[1].attn
    key_dim, heads = mixer.key_dim, mixer.A_log.shape[0]
    for e in range(cfg.model.num_memories):
        assert torch.equal(attn.k_proj[e].weight, mixer.memory_kv_proj[e, :key_dim])
        assert torch.equal(attn.v_proj[e].weight, mixer.memory_kv_proj[e, key_dim:])
        assert torch.equal(attn.b_proj[e].weight, mixer.memory_ba_proj[e, :heads])
        assert torch.equal(attn.a_proj[e].weight, mixer.memory_ba_proj[e, heads:])
    assert torch.equal(attn.shared_k.weight, mixer.memory_kv_proj[-1, :key_dim])
    assert torch.equal(attn.shared_a.weight, mixer.memory_ba_proj[-1, heads:])
    assert torch.equal(attn.gate.weight, mixer.router.weight)
    assert torch.equal(attn.v_conv1d.weight[:, 0], mixer.v_conv1d.weight)
    assert model.lm_head.weight is model.model.embeddings.weight


# (our config, format): the paper-sized models on the meta device
SIZES = [("mom_340m.yaml", "fla"), ("gdn_340m.yaml", "fla"), ("transformer_340m.yaml", "fla"),
         ("transformer_340m.yaml", "llama")]


@pytest.mark.parametrize("name,fmt", SIZES, ids=[f"{n[:-5]}-{f}" for n, f in SIZES])
def test_weight_map_is_exact_at_340m(name: str, fmt: str, fla_transformers):
    """Every tensor name and shape of the HF class equals what we export, and the parameter counts agree."""
    cfg = load_config(CONFIGS / name)
    hf = hf_config(cfg.model, fmt, cfg.training.seq_len, 1, 2)
    config = fla_transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
    with torch.device("meta"):
        theirs = fla_transformers.AutoModelForCausalLM.from_config(config)
        ours = build_model(cfg.model)
    count = sum(p.numel() for p in theirs.parameters())
    assert count == count_parameters(cfg.model)["total"]
    exported = {k: tuple(v.shape) for k, v in to_hf(ours.state_dict(), cfg.model, fmt).items()}
    names = _fla_names(theirs)
    # the tied head is the embedding
    names.pop("lm_head.weight")
    assert exported == names


def test_imported_weights_train_on_with_fresh_optimizer(tmp_path, capsys):
    run = tiny_config(tmp_path / "runs", "trained", "mom", "training.micro_batch_size=4", "training.steps=3",
                      "training.warmup_steps=1", "checkpoint.interval=0", "eval.interval=0", "logging.interval=1")
    train_mod.train(run)
    out = export_checkpoint(run.run.path, tmp_path / "hf")
    imported = import_hf(out, tmp_path / "runs" / "continued", CONFIGS / "quickstart.yaml",
                         [*RUNTIME, "training.micro_batch_size=4", "training.steps=2", "training.warmup_steps=1",
                          "checkpoint.interval=0", "eval.interval=0", "logging.interval=1",
                          "model.aux_loss_coef=0.02"])
    assert imported.config.model == dataclasses.replace(run.model, aux_loss_coef=0.02)
    cfg = load_config(imported.config.run.path / "config.yaml", world_size=1)
    # the loss of the first step is the imported model's on the first batch of a fresh data stream
    model = load_model(imported.checkpoint, cfg, CPU)
    train_mod.seed_everything(cfg.run.seed)
    batch = next(build_loader(cfg, 0, 1, split="train"))
    with torch.no_grad():
        first = model(batch.input_ids, cu_seqlens=batch.cu_seqlens, labels=batch.labels)
    expected = (first.loss_sum / first.num_valid).item()
    capsys.readouterr()
    train_mod.train(cfg)
    assert "fresh optimizer" in capsys.readouterr().out
    records = [json.loads(line) for line in (cfg.run.path / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert abs(losses[1] - expected) <= 1e-5 * expected, (losses, expected)
    # the run goes on as any run: a full checkpoint at the end, which resumes normally
    final = latest_checkpoint(cfg.run.path)
    assert final.name == "step_0000002" and not is_weights_only(final) and (final / "optimizer.pt").is_file()


def test_mistakes_are_refused_by_name(tmp_path, capsys):
    cfg = tiny_config(tmp_path / "runs", "run", "mom")
    random_checkpoint(cfg)
    assert main(["export", "--checkpoint", str(cfg.run.path), "--out", str(tmp_path / "x"), "--format", "llama"]) == 2
    assert "--format fla" in capsys.readouterr().err
    out = export_checkpoint(cfg.run.path, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    weights = read_weights(out)
    import safetensors.torch

    def variant(name: str, config_changes: dict, tensors: dict) -> str:
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps({**config, **config_changes}))
        safetensors.torch.save_file(tensors, str(d / "model.safetensors"))
        with pytest.raises(ConfigError) as e:
            import_hf(d, tmp_path / f"run_{name}")
        return str(e.value)

    assert "single_kv_proj" in variant("single_kv", {"single_kv_proj": True}, weights)
    assert "hybrid" in variant("hybrid", {"attn": {"layers": [1], "num_heads": 2}}, weights)
    missing = dict(weights)
    missing.pop("model.layers.1.attn.v_proj.2.weight")
    assert "model.layers.1.attn.v_proj.2.weight" in variant("missing", {}, missing)
    extra = {**weights, "model.layers.0.attn.q_norm.weight": torch.ones(16)}
    assert "model.layers.0.attn.q_norm.weight" in variant("extra", {}, extra)
    assert "shape" in variant("wrong_heads", {"num_heads": 1, "head_dim": 32}, weights)
    untied_head = {**weights, "lm_head.weight": torch.zeros_like(weights["model.embeddings.weight"])}
    assert "tie_word_embeddings" in variant("head", {}, untied_head)
    with pytest.raises(ConfigError, match="model.num_heads"):
        import_hf(out, tmp_path / "ok", CONFIGS / "quickstart.yaml", [*RUNTIME, "model.num_heads=4"])
    import_hf(out, tmp_path / "ok", CONFIGS / "quickstart.yaml", RUNTIME)
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        import_hf(out, tmp_path / "ok", CONFIGS / "quickstart.yaml", RUNTIME)
