"""Config schema: parsing, inheritance, overrides, every error class, and the resolved-config dump."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mom_train.config import Config, ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def base_file(tmp_path):
    return write(tmp_path / "base.yaml", """
run: {name: base, seed: 7}
model: {arch: mom, hidden_size: 64, num_layers: 2, num_heads: 2, head_dim: 32, vocab_size: 256}
training: {lr: 1.0e-3, steps: 100, warmup_steps: 10, micro_batch_size: 4, seq_len: 64, betas: [0.9, 0.99]}
data: {mqar: {num_pairs: 8}}
""")


def test_parse_types_and_defaults(base_file):
    cfg = load_config(base_file)
    assert cfg.run.name == "base" and cfg.run.seed == 7
    assert cfg.model.hidden_size == 64 and isinstance(cfg.model.expand_v, float)
    assert cfg.training.lr == pytest.approx(1e-3) and cfg.training.betas == [0.9, 0.99]
    assert cfg.data.mqar.num_pairs == 8
    # untouched keys keep the schema defaults
    assert cfg.checkpoint.resume == "auto" and cfg.parallel.tp == 1


def test_inheritance_deep_merges(tmp_path, base_file):
    sub = tmp_path / "sub"
    sub.mkdir()
    child = write(sub / "child.yaml", "base: ../base.yaml\nrun: {name: child}\nmodel: {num_layers: 3}\n")
    cfg = load_config(child)
    assert cfg.run.name == "child" and cfg.run.seed == 7
    assert cfg.model.num_layers == 3 and cfg.model.hidden_size == 64


def test_inheritance_loop_is_an_error(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: c.yaml\n")
    write(tmp_path / "c.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="loops") as e:
        load_config(tmp_path / "a.yaml")
    # every file of the cycle, in order
    names = [part.strip().rsplit("/", 1)[-1] for part in str(e.value).split(":", 1)[1].split(";")[0].split("->")]
    assert names == ["a.yaml", "b.yaml", "c.yaml", "a.yaml"]
    write(tmp_path / "self.yaml", "base: self.yaml\n")
    with pytest.raises(ConfigError, match="self.yaml -> .*self.yaml"):
        load_config(tmp_path / "self.yaml")


@pytest.mark.parametrize("name", ["", " ", "a/b", "..", "."])
def test_run_name_must_be_one_directory(base_file, name):
    with pytest.raises(ConfigError, match="`run.name`"):
        load_config(base_file, [f"run.name={name}"])


def test_overrides_parse_to_field_types(base_file):
    cfg = load_config(base_file, ["training.lr=2e-4", "model.num_layers=5", "run.name=007",
                                  "model.shared_memory=false", "training.betas=[0.8,0.9]",
                                  "data.mqar.num_pairs=16", "training.global_batch_tokens=null",
                                  "data.subset_weights={RedPajamaArXiv: 0.5}"])
    assert cfg.training.lr == pytest.approx(2e-4)
    assert cfg.model.num_layers == 5
    assert cfg.run.name == "007"
    assert cfg.model.shared_memory is False
    assert cfg.training.betas == [0.8, 0.9]
    assert cfg.data.mqar.num_pairs == 16
    assert cfg.data.subset_weights == {"RedPajamaArXiv": 0.5}


@pytest.mark.parametrize("override, needles", [
    ("training.lrr=0.1", ["training.lrr", "training.lr"]),
    ("trainin.lr=0.1", ["trainin", "training"]),
    ("data.mqar.num_pair=3", ["data.mqar.num_pair", "num_pairs"]),
], ids=["key", "section", "nested"])
def test_unknown_key_suggests(base_file, override, needles):
    with pytest.raises(ConfigError) as e:
        load_config(base_file, [override])
    for needle in needles:
        assert needle in str(e.value)


def test_unknown_key_in_yaml(tmp_path):
    path = write(tmp_path / "c.yaml", "model: {hiden_size: 3}\n")
    with pytest.raises(ConfigError, match=r"model\.hiden_size.*model\.hidden_size"):
        load_config(path)


@pytest.mark.parametrize("override, needles", [
    ("training.lr=abc", ["training.lr", "float"]),
    ("model.num_layers=2.5", ["model.num_layers", "integer"]),
    ("model.shared_memory=maybe", ["model.shared_memory", "boolean"]),
    ("model.arch=rnn", ["model.arch", "'mom'"]),
    ("training.betas=0.9", ["training.betas", "list"]),
], ids=["float", "int", "bool", "choice", "list"])
def test_wrong_type(base_file, override, needles):
    with pytest.raises(ConfigError) as e:
        load_config(base_file, [override])
    for needle in needles:
        assert needle in str(e.value)


@pytest.mark.parametrize("override, needle", [
    ("training.lr=-1", "training.lr"),
    ("training.min_lr_ratio=1.5", "training.min_lr_ratio"),
    ("parallel.zero_stage=4", "parallel.zero_stage"),
    ("model.num_layers=0", "model.num_layers"),
], ids=["lr", "ratio", "zero", "layers"])
def test_out_of_range(base_file, override, needle):
    with pytest.raises(ConfigError, match="out of range") as e:
        load_config(base_file, [override])
    assert needle in str(e.value)


@pytest.mark.parametrize("overrides, world, needle", [
    (["parallel.tp=4"], 4, "num_heads"),
    (["training.global_batch_size=6"], 1, "micro_batch_size"),
    (["training.global_batch_size=8"], 4, "data-parallel size"),
    (["model.topk=5"], 1, "model.topk"),
    (["parallel.tp=2"], 3, "world size 3"),
    (["training.global_batch_tokens=100"], 1, "seq_len"),
    (["data.source=files"], 1, "data.path"),
    (["training.warmup_steps=1000"], 1, "warmup_steps"),
    (["model.head_dim=8"], 1, "key head sizes 16 to 256"),
    (["model.head_dim=320"], 1, "key head sizes 16 to 256"),
], ids=["heads-tp", "batch-micro", "batch-dp", "topk", "world-tp", "tokens-seq", "files-path", "warmup", "head-8",
        "head-320"])
def test_cross_field(base_file, overrides, world, needle):
    with pytest.raises(ConfigError) as e:
        load_config(base_file, overrides, world_size=world)
    assert needle in str(e.value)


def test_missing_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path / "bad.yaml", "model: [unclosed\n"))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path / "list.yaml", "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(write(tmp_path / "child.yaml", "base: missing.yaml\n"))


def test_bad_override_syntax(base_file):
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(base_file, ["training.lr"])
    with pytest.raises(ConfigError, match="is a section"):
        load_config(base_file, ["training=3"])


def test_derived_batch(base_file):
    cfg = load_config(base_file, ["training.global_batch_tokens=2048"], world_size=2)
    # 2048 tokens / 64 per sequence = 32 sequences; 32 / (4 micro x 2 ranks) = 4 accumulation steps
    assert cfg.global_batch_sequences(2) == 32
    assert cfg.grad_accum_steps(2) == 4


def test_dump_round_trips(tmp_path, base_file):
    cfg = load_config(base_file, ["training.lr=5e-4", "data.subset_weights={A: 1.0}"])
    out = tmp_path / "run" / "config.yaml"
    cfg.dump(out)
    assert yaml.safe_load(out.read_text())["training"]["lr"] == pytest.approx(5e-4)
    assert load_config(out) == cfg
    assert not list(out.parent.glob("*.tmp"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_load(path):
    parallel = yaml.safe_load(path.read_text()).get("parallel", {})
    world = parallel.get("tp", 1) * parallel.get("cp", 1)
    assert isinstance(load_config(path, world_size=world), Config)


def test_small_heads_need_the_torch_backend(base_file):
    # the Triton kernels' limits do not bind the plain PyTorch path
    assert load_config(base_file, ["model.head_dim=8", "model.kernel_backend=torch"]).model.head_dim == 8


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "mom_train", *args], capture_output=True, text=True, cwd=REPO)


def test_cli_errors_have_no_traceback(tmp_path):
    quick = REPO / "configs" / "quickstart.yaml"
    cases = [
        (["train", "--config", str(quick), "training.lrr=0.1", "--dry-run"], ["training.lrr", "training.lr"]),
        (["train", "--config", str(quick), "training.lr=abc", "--dry-run"], ["training.lr", "float"]),
        (["train", "--config", str(tmp_path / "missing.yaml"), "--dry-run"], [str(tmp_path / "missing.yaml")]),
    ]
    for args, needles in cases:
        res = run_cli(*args)
        assert res.returncode == 2, res.stderr
        assert "Traceback" not in res.stderr + res.stdout
        for needle in needles:
            assert needle in res.stderr


def test_cli_dry_run_prints_the_rank_layout():
    import os

    env = {**os.environ, "WORLD_SIZE": "8"}
    res = subprocess.run([sys.executable, "-m", "mom_train", "train", "--config", str(REPO / "configs" / "mom_2.7b.yaml"),
                          "--dry-run"], capture_output=True, text=True, cwd=REPO, env=env)
    assert res.returncode == 0, res.stderr
    assert "layout: 8 rank(s) = dp 4 x cp 1 x tp 2 (sequence parallel)" in res.stdout
    assert "parameters per rank:" in res.stdout


def test_cli_dry_run_prints_config_and_model_size():
    res = run_cli("train", "--config", str(REPO / "configs" / "quickstart.yaml"), "--dry-run")
    assert res.returncode == 0, res.stderr
    assert "# resolved config" in res.stdout
    assert "parameters total" in res.stdout and "FLOPs/token" in res.stdout


def test_memory_estimate_shards_what_each_zero_stage_shards():
    from mom_train.parallel.memory import estimate_memory

    cfg = load_config(REPO / "configs" / "mom_1.3b.yaml", ["training.cuda_graphs=false"], world_size=8)
    params = 1_000_000
    stages = {}
    for stage, engine in ((0, "native"), (1, "native"), (2, "native"), (2, "deepspeed"), (3, "deepspeed")):
        cfg.parallel.zero_stage, cfg.parallel.engine = stage, engine
        stages[(stage, engine)] = estimate_memory(cfg, 8, params)
    assert stages[(0, "native")]["optimizer"] == 8 * params
    assert stages[(1, "native")]["optimizer"] == params and stages[(1, "native")]["gradients"] == 4 * params
    # our stage 2 keeps the whole gradient buffer; DeepSpeed's shards it; stage 3 also the parameters
    assert stages[(2, "native")]["gradients"] == 4 * params
    assert stages[(2, "deepspeed")]["gradients"] == params / 2
    assert stages[(3, "deepspeed")]["parameters"] == params / 2
    # activations do not depend on the stage, and recompute keeps far fewer
    assert len({s["activations"] for s in stages.values()}) == 1
    cfg.training.activation_checkpointing = True
    assert estimate_memory(cfg, 8, params)["activations"] < stages[(0, "native")]["activations"] / 5
