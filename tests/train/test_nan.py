"""A NaN injected into the loss triggers training.nan_policy: skip (no update, counted) or stop (save, raise)."""
from __future__ import annotations

import json

import pytest
import torch

import mom_train.train as train_mod
from mom_train.checkpoint import latest_checkpoint, load_main, load_rank
from tests.train.conftest import mqar_config

NAN_STEP = 3


def _nan_at_step(monkeypatch, step: int) -> None:
    """The training forward of optimizer step `step` returns a NaN loss_sum (grad accumulation 1)."""
    build = train_mod.build_model

    def build_with_nan(model_cfg):
        model = build(model_cfg)
        forward, calls = model.forward, []

        def forward_with_nan(*args, **kwargs):
            out = forward(*args, **kwargs)
            if model.training:
                calls.append(1)
                if len(calls) == step:
                    out.loss_sum = out.loss_sum * float("nan")
            return out

        model.forward = forward_with_nan
        return model

    monkeypatch.setattr(train_mod, "build_model", build_with_nan)


def test_nan_skip(tmp_path, monkeypatch):
    _nan_at_step(monkeypatch, NAN_STEP)
    out = train_mod.train(mqar_config(tmp_path, "training.nan_policy=skip", "checkpoint.interval=1",
                                      "checkpoint.keep=10"))
    assert out["step"] == 6 and out["skipped_steps_total"] == 1
    records = [json.loads(line) for line in (tmp_path / "quickstart" / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r for r in records}
    assert by_step[NAN_STEP]["loss"] is None and by_step[NAN_STEP]["skipped_steps"] == 1
    assert all(by_step[s]["skipped_steps"] == 0 and by_step[s]["loss"] is not None for s in by_step if s != NAN_STEP)
    ckpts = tmp_path / "quickstart" / "checkpoints"
    model = {s: load_main(ckpts / f"step_{s:07d}", "model") for s in (NAN_STEP - 1, NAN_STEP, NAN_STEP + 1)}
    opt = {s: load_main(ckpts / f"step_{s:07d}", "optimizer") for s in (NAN_STEP - 1, NAN_STEP)}
    # the skipped step changed no parameter and no optimizer moment; the next one did
    assert all(torch.equal(model[NAN_STEP - 1][k], model[NAN_STEP][k]) for k in model[NAN_STEP])
    assert not all(torch.equal(model[NAN_STEP][k], model[NAN_STEP + 1][k]) for k in model[NAN_STEP])
    for i, state in opt[NAN_STEP]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, opt[NAN_STEP - 1]["state"][i][name]), name
    assert all(torch.isfinite(v).all() for v in model[NAN_STEP + 1].values())


@pytest.mark.parametrize("log_interval", [1, 4], ids=["read-at-once", "read-during-next-step"])
def test_nan_stop(tmp_path, monkeypatch, log_interval):
    """The step's flag is read at once where the step is logged, and otherwise during the next step's forward
    and backward (before its update): either way the state before the NaN step is saved."""
    # the same run without the NaN, checkpointing every step
    train_mod.train(mqar_config(tmp_path / "ref", "checkpoint.interval=1", "checkpoint.keep=10"))
    _nan_at_step(monkeypatch, NAN_STEP)
    with pytest.raises(train_mod.NonFiniteError, match=f"step {NAN_STEP} .*nan_policy=stop"):
        train_mod.train(mqar_config(tmp_path / "run", "training.nan_policy=stop",
                                    f"logging.interval={log_interval}"))
    saved = latest_checkpoint(tmp_path / "run" / "quickstart")
    assert saved.name == f"step_{NAN_STEP - 1:07d}"
    assert load_main(saved, "train_state")["step"] == NAN_STEP - 1
    assert load_rank(saved, 0)["data"]["batches"] == NAN_STEP - 1
    ref = tmp_path / "ref" / "quickstart" / "checkpoints" / saved.name
    ref_model, model = load_main(ref, "model"), load_main(saved, "model")
    assert all(torch.equal(ref_model[k], model[k]) for k in ref_model)
