"""The DeepSpeed engine (parallel.engine=deepspeed, and ZeRO stage 3) on CPU / gloo: 2 ranks train like our
engine at stage 0 (every step's loss and grad norm, and the checkpoint's weights and AdamW moments, to
relative 1e-5), checkpoints move between engines and stages, preemption under stage 3 saves and resumes,
and a user's DeepSpeed JSON is merged under the run's settings with every conflict named."""
from __future__ import annotations

import json

import pytest

from mom_train.checkpoint import latest_checkpoint
from mom_train.config import ConfigError
from mom_train.parallel.deepspeed import deepspeed_config
from mom_train.parallel.dims import ParallelDims
from tests.train.conftest import mqar_config, train_ranks
from tests.train.test_zero import DP, assert_checkpoints_match, assert_runs_match


@pytest.mark.parametrize("overrides", [["parallel.engine=deepspeed", "parallel.zero_stage=2"],
                                       ["parallel.zero_stage=3"]], ids=["deepspeed-stage2", "stage3"])
def test_deepspeed_trains_like_our_engine(tmp_path, reference_runs, overrides):
    train_ranks(tmp_path / "ds", 2, [*DP, *overrides])
    assert_runs_match(tmp_path / "ds", reference_runs(2, DP))
    assert_checkpoints_match(tmp_path / "ds", reference_runs(2, DP))


def test_checkpoints_move_between_engines_and_stages(tmp_path, reference_runs):
    # stage 3 (DeepSpeed) -> 0 (ours) -> 2 (ours) -> DeepSpeed stage 2, each resumed from the last checkpoint;
    # the run continues as if never interrupted. Stage 3 is stopped by SIGTERM, saves and exits normally.
    run = tmp_path / "mixed"
    train_ranks(run, 2, [*DP, "parallel.zero_stage=3"], preempt_after=2)
    assert latest_checkpoint(run / "quickstart").name == "step_0000001"
    train_ranks(run, 2, DP, preempt_after=2)
    train_ranks(run, 2, [*DP, "parallel.zero_stage=2"], preempt_after=2)
    train_ranks(run, 2, [*DP, "parallel.engine=deepspeed", "parallel.zero_stage=2"])
    assert_runs_match(run, reference_runs(2, DP))
    assert_checkpoints_match(run, reference_runs(2, DP))


def test_user_deepspeed_json_is_merged_under_the_run(tmp_path):
    user = {"zero_optimization": {"stage": 1, "overlap_comm": True}, "gradient_clipping": 5.0,
            "optimizer": {"type": "Adam"}, "communication_data_type": "fp32"}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    cfg = mqar_config(tmp_path, "parallel.zero_stage=3", f"parallel.deepspeed_config={path}",
                      "training.grad_clip=0.5")
    notes = []
    merged = deepspeed_config(cfg, ParallelDims(), 2, log=notes.append)
    # ours wins where both set a key; the user's other keys stay
    assert merged["zero_optimization"] == {"stage": 3, "overlap_comm": True}
    assert merged["gradient_clipping"] == 0.5 and merged["gradient_accumulation_steps"] == 2
    assert merged["communication_data_type"] == "fp32" and "optimizer" not in merged
    assert any("zero_optimization.stage = 1" in n for n in notes)
    assert any("gradient_clipping = 5.0" in n for n in notes)
    assert any("'optimizer'" in n for n in notes)


@pytest.mark.parametrize("overrides, match", [
    (["parallel.zero_stage=3", "parallel.engine=native"], "runs on DeepSpeed"),
    (["parallel.engine=deepspeed", "training.cuda_graphs=true"], "cuda_graphs"),
    (["parallel.deepspeed_config=ds.json"], "native engine"),
])
def test_deepspeed_config_errors(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        mqar_config(tmp_path, *overrides)


def test_unreadable_deepspeed_json_names_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    cfg = mqar_config(tmp_path, "parallel.zero_stage=3", f"parallel.deepspeed_config={bad}")
    with pytest.raises(ConfigError, match="bad.json"):
        deepspeed_config(cfg, ParallelDims(), 1)
