"""`mom-train import`: a Hugging Face checkpoint directory (fla's MoM / Gated DeltaNet / Transformer, or Llama)
-> a run directory of ours whose step-0 checkpoint holds the weights only:

    RUN/config.yaml                          the resolved config (model section from config.json)
        tokenizer.model                      the sentencepiece model, when the directory ships one
        latest, checkpoints/step_0000000/    model.pt (fp32), config.yaml, train_state.pt (weights_only)

`mom-train train --config RUN/config.yaml` then trains on from these weights with a fresh optimizer, LR
schedule from step 0 and the data stream from its start; `eval`, `generate` and `lm-eval` read it like any run.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from mom_train.checkpoint import latest_checkpoint, save_weights_only
from mom_train.config import Config, ConfigError, load_config, validate
from mom_train.hf.configs import model_config, model_config_from_hf
from mom_train.hf.files import read_weights
from mom_train.hf.weights import from_hf

SP_MODEL = "tokenizer.model"
# model fields config.json carries that shape training, not the weights: overrides may change them
TRAINING_FIELDS = ("aux_loss_coef", "init_std")


@dataclass
class Imported:
    """What `import_hf` wrote: the run's config and checkpoint, and notes for the user."""
    config: Config
    checkpoint: Path
    notes: list[str]


def _override(key: str, value: object) -> str:
    """A `section.key=value` override whose value the config loader reads back as `value`."""
    return f"{key}={value}" if isinstance(value, str) else f"{key}={json.dumps(value)}"


def import_hf(hf_dir: str | os.PathLike, out: str | os.PathLike, config: str | os.PathLike | None = None,
              overrides: list[str] | tuple[str, ...] = ()) -> Imported:
    """Import `hf_dir` into the run directory `out` (see the module docstring).

    config: a YAML whose training, data and runtime settings the run takes (default: the schema's defaults
    with data.source=slimpajama); the model's architecture always comes from config.json. overrides apply
    last (e.g. data.tokenizer=..., training.lr=...)."""
    hf_dir, out = Path(hf_dir), Path(out)
    config_json = hf_dir / "config.json"
    if not config_json.is_file():
        raise ConfigError(f"no config.json in {hf_dir}; --hf takes a Hugging Face checkpoint directory (as "
                          "save_pretrained or `mom-train export` writes it)")
    if latest_checkpoint(out) is not None:
        raise ConfigError(f"{out} already holds checkpoints; import into a new run directory (or remove it)")
    fields, fmt = model_config_from_hf(json.loads(config_json.read_text()), str(config_json))
    overridden = {key.removeprefix("model.") for key, _, _ in (o.partition("=") for o in overrides)
                  if key.startswith("model.")}
    fixed = sorted(overridden & set(fields) - set(TRAINING_FIELDS))
    if fixed:
        raise ConfigError(f"{', '.join('model.' + k for k in fixed)}: the imported model's architecture comes from "
                          f"{config_json}; drop these overrides (runtime settings such as model.kernel_backend, "
                          f"and {', '.join('model.' + k for k in TRAINING_FIELDS)}, may be set)")
    # an explicit override of a training setting wins over config.json's value
    fields = {k: v for k, v in fields.items() if k not in overridden}
    notes = []
    generated = [_override("run.dir", str(out.parent)), _override("run.name", out.name)]
    if config is None:
        generated.append("data.source=slimpajama")
    sp_model = hf_dir / SP_MODEL
    if sp_model.is_file():
        generated.append(_override("data.tokenizer", str((out / SP_MODEL).resolve())))
    cfg = load_config(config, [*generated, *overrides], world_size=1)
    cfg.model = model_config(fields, cfg.model)
    validate(cfg, world_size=1)
    if not sp_model.is_file() and cfg.data.source != "mqar":
        notes.append(f"no sentencepiece {SP_MODEL} in {hf_dir}: data.tokenizer is {cfg.data.tokenizer!r}; set "
                     "data.tokenizer=PATH if the model was trained with another tokenizer")
    # our checkpoints hold fp32 master weights
    state = {k: v.float() for k, v in from_hf(read_weights(hf_dir), cfg.model, fmt, str(hf_dir)).items()}
    out.mkdir(parents=True, exist_ok=True)
    if sp_model.is_file():
        shutil.copyfile(sp_model, out / SP_MODEL)
    cfg.dump(out / "config.yaml")
    checkpoint = save_weights_only(out, state, cfg, source=str(hf_dir.resolve()))
    return Imported(cfg, checkpoint, notes)

