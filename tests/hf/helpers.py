"""Tiny runs of every arch for the Hugging Face tests: configs and step-0 checkpoints of random weights."""
from __future__ import annotations

from pathlib import Path

import torch

from mom_train.checkpoint import save_weights_only
from mom_train.config import Config, load_config
from mom_train.model import build_model

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"

TINY_MODEL = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.head_dim=16",
              "model.hidden_ratio=2", "model.kernel_backend=torch", "run.device=cpu", "training.precision=fp32",
              "logging.progress_bar=false"]
# per arch: the overrides of a tiny model of it (a larger init_std so every weight visibly moves the logits)
ARCH = {"mom": ["model.arch=mom", "model.init_std=0.2"],
        "gated_deltanet": ["model.arch=gated_deltanet", "model.expand_v=2", "model.init_std=0.2"],
        "transformer": ["model.arch=transformer", "model.init_std=0.2"]}


def tiny_config(run_dir: Path, name: str, arch: str, *overrides: str, text: bool = False) -> Config:
    """A tiny `arch` run: MQAR (vocab 130) from quickstart.yaml, or text with the Mistral tokenizer
    (vocab 32000) from tiny_text.yaml."""
    base = CONFIGS / ("tiny_text.yaml" if text else "quickstart.yaml")
    return load_config(base, [f"run.dir={run_dir}", f"run.name={name}", *TINY_MODEL, *ARCH[arch], *overrides],
                       world_size=1)


def random_checkpoint(cfg: Config, seed: int = 0) -> Path:
    """Step 0 of run cfg holding a freshly initialised model (seeded)."""
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    return save_weights_only(cfg.run.path, model.state_dict(), cfg, source="random init")
