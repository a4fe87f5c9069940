"""scripts/study_mqar.py: the cpu-smoke grid end to end (results from the trainer's evaluation, finished cells
skipped on a rerun, unfinished ones trained again) and the GPU grid's cells (valid configs, matched states)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from mom_train.eval import run_eval
from mom_train.model import state_bytes
from tests.scripts import load_script


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def study():
    return load_script("study_mqar")


def test_cpu_smoke(tmp_path, study, monkeypatch):
    out = tmp_path / "study"
    assert study.main(["--preset", "cpu-smoke", "--out", str(out)]) == 0
    rows = read_rows(out / "results.csv")
    grid = study.load_grid(study.STUDIES / "mqar_cpu_smoke.yaml")
    cells = study.grid_cells(grid)
    assert [r["cell"] for r in rows] == [c.name for c in cells] == ["mom-s0", "gdn-s0"]
    assert list(rows[0]) == ["arch", *study.COLUMNS]
    assert [r["model_arch"] for r in rows] == ["mom", "gated_deltanet"]
    for row, cell in zip(rows, cells):
        cfg = study.cell_config(grid, cell, out)
        # the recall and loss are the trainer's evaluation at the last step: a recount from the final checkpoint
        recount = run_eval(out / "runs" / row["cell"])
        assert recount["step"] == int(row["steps"]) == cfg.training.steps
        assert float(row["eval_recall"]) == recount["eval_recall"]
        assert float(row["eval_loss"]) == recount["eval_loss"]
        assert int(row["state_bytes"]) == state_bytes(cfg.model, cfg.training.seq_len)["total"]
        assert float(row["train_seconds"]) > 0
    assert (out / "recall_vs_state.png").stat().st_size > 0 and (out / "recall_vs_pairs.png").stat().st_size > 0

    # a rerun trains only the cells whose final evaluation is not logged: drop the second cell's. Its last
    # checkpoint is there, so the study evaluates that instead, to the same scores
    trained = []

    def fake_train(cfg):
        trained.append(cfg.run.name)
        return {"preempted": False}

    metrics = out / "runs" / "gdn-s0" / "metrics.jsonl"
    kept = [line for line in metrics.read_text().splitlines() if "eval_recall" not in json.loads(line)]
    metrics.write_text("".join(line + "\n" for line in kept))
    monkeypatch.setattr(study, "train", fake_train)
    assert study.main(["--preset", "cpu-smoke", "--out", str(out)]) == 0
    assert trained == ["gdn-s0"]
    again = read_rows(out / "results.csv")
    assert again[0] == rows[0]
    assert json.loads((out / "runs" / "gdn-s0" / "study_eval.json").read_text())["step"] == 6
    assert {k: v for k, v in again[1].items() if k != "train_seconds"} == \
        {k: v for k, v in rows[1].items() if k != "train_seconds"}


def test_shard_trains_every_nth_cell(tmp_path, study, monkeypatch):
    trained = []
    monkeypatch.setattr(study, "train", lambda cfg: trained.append(cfg.run.name) or {"preempted": False})
    assert study.main(["--preset", "cpu-smoke", "--out", str(tmp_path), "--shard", "1/2"]) == 0
    assert trained == ["gdn-s0"]
    # a shard leaves the results to --report, which trains nothing
    assert not (tmp_path / "results.csv").exists()
    assert study.main(["--preset", "cpu-smoke", "--out", str(tmp_path), "--report"]) == 0
    assert trained == ["gdn-s0"] and read_rows(tmp_path / "results.csv") == []


def test_edited_grid_refuses_a_stale_run(tmp_path, study, monkeypatch):
    grid = study.load_grid(study.STUDIES / "mqar_cpu_smoke.yaml")
    cell = study.grid_cells(grid)[0]
    cfg = study.cell_config(grid, cell, tmp_path)
    cfg.dump(cfg.run.path / "config.yaml")
    grid.common.append(f"training.lr={cfg.training.lr * 2}")
    monkeypatch.setattr(study, "train", lambda cfg: pytest.fail("trained a cell whose run has another config"))
    with pytest.raises(study.ConfigError, match="training.lr"):
        study.run_cell(study.cell_config(grid, cell, tmp_path), cell)


def assert_gated_deltanet_states_match_mom(configs: dict) -> None:
    """Per task, Gated DeltaNet with MoM's whole state (gdn_total) and with the state a MoM token reads and
    writes (gdn_active) beside MoM with 4 memories, top-2 and the shared memory; configs by cell name."""
    moms = [name for name in configs if name.startswith("mom_e4k2_shared-")]
    assert moms
    for name in moms:
        cfg = configs[name]
        mom = state_bytes(cfg.model, cfg.training.seq_len)
        gdn_total, gdn_active = (configs[name.replace("mom_e4k2_shared", arch)] for arch in ("gdn_total", "gdn_active"))
        assert (gdn_total.model.arch, gdn_active.model.arch) == ("gated_deltanet", "gated_deltanet")
        assert state_bytes(gdn_total.model, cfg.training.seq_len)["total"] == mom["total"]
        assert state_bytes(gdn_active.model, cfg.training.seq_len)["total"] == mom["active"] < mom["total"]


def test_gpu_grid(study):
    grid = study.load_grid(study.STUDIES / "mqar.yaml")
    assert len(grid.seeds) >= 3
    # seeds change nothing else: one seed's cells cover every config
    configs = {c.name: study.cell_config(grid, c, Path("runs")) for c in study.grid_cells(grid)
               if c.seed == grid.seeds[0]}
    assert len(configs) * len(grid.seeds) == len(study.grid_cells(grid))
    assert {cfg.model.num_layers for cfg in configs.values()} == {2}
    assert {cfg.model.hidden_size for cfg in configs.values()} == {64, 128, 256}
    assert {cfg.data.mqar.num_pairs for cfg in configs.values()} == {16, 32, 64, 128}
    for cfg in configs.values():
        # the queries follow the pairs: the shortest of the grid's lengths that holds 1 + 4n tokens
        n = cfg.data.mqar.num_pairs
        assert cfg.data.mqar.num_queries == n
        assert cfg.training.seq_len == min(t for t in (256, 512, 1024) if t >= 1 + 4 * n)
    assert_gated_deltanet_states_match_mom(configs)


@pytest.mark.parametrize("name", ["mqar_h200.yaml", "mqar_h200_hard.yaml"])
def test_one_gpu_grids(study, name):
    """The grids run on one H200 (README): 3 seeds, sequences just long enough (1 + 4n, to a multiple of 4),
    Gated DeltaNet's state matched to MoM's whole and active state, CUDA graphs on."""
    grid = study.load_grid(study.STUDIES / name)
    assert len(grid.seeds) >= 3
    configs = {c.name: study.cell_config(grid, c, Path("runs")) for c in study.grid_cells(grid)
               if c.seed == grid.seeds[0]}
    assert {cfg.model.arch for cfg in configs.values()} == {"mom", "gated_deltanet", "transformer"}
    for name_, cfg in configs.items():
        n = cfg.data.mqar.num_pairs
        assert cfg.data.mqar.num_queries == n and cfg.training.seq_len == -(-(1 + 4 * n) // 4) * 4, name_
        assert cfg.training.cuda_graphs and cfg.eval.interval and cfg.training.steps % cfg.eval.interval == 0
    assert_gated_deltanet_states_match_mom(configs)


def test_procs_train_the_cells_in_parallel_processes(tmp_path, study):
    """--procs 2: two processes of the script take a cell each (sub-shards 0/2 and 1/2, one log each), then the
    parent writes the report of both."""
    out = tmp_path / "study"
    assert study.main(["--preset", "cpu-smoke", "--out", str(out), "--procs", "2"]) == 0
    assert [r["cell"] for r in read_rows(out / "results.csv")] == ["mom-s0", "gdn-s0"]
    logs = [(out / "logs" / f"shard_{j}.log").read_text() for j in range(2)]
    assert "mom-s0" in logs[0] and "gdn-s0" not in logs[0]
    assert "gdn-s0" in logs[1] and "mom-s0" not in logs[1]
    with pytest.raises(SystemExit):
        study.main(["--preset", "cpu-smoke", "--procs", "0"])
