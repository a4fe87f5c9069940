"""MQAR recall study: MoM against Gated DeltaNet and Transformer++ over a grid of models and tasks.

    python scripts/study_mqar.py --grid configs/studies/mqar.yaml                # train every cell, then report
    python scripts/study_mqar.py --preset cpu-smoke --out /tmp/smoke             # configs/studies/mqar_cpu_smoke.yaml
    python scripts/study_mqar.py --grid configs/studies/mqar.yaml --list         # cells, parameters, state sizes
    CUDA_VISIBLE_DEVICES=3 python scripts/study_mqar.py --grid ... --shard 3/8   # every 8th cell from the 4th
    python scripts/study_mqar.py --grid configs/studies/mqar_h200.yaml --procs 15  # 15 processes share a GPU
    python scripts/study_mqar.py --grid configs/studies/mqar.yaml --report       # finished cells (after shards)

A grid file names a base config, overrides every cell shares, named axes (each value a list of overrides)
and seeds; a cell is one value of every axis and one seed, and its config is the base config plus the common
overrides, its values' overrides and run.seed, exactly what `mom-train train --config BASE ...` would run.
Each cell trains through `mom_train.train.train` into <out>/runs/<cell>/; the trainer evaluates recall on
the held-out MQAR stream (`mom_train.eval.evaluate`) at the last step and logs it to the run's
metrics.jsonl, which is where the results come from. A cell whose final evaluation is logged is finished
and skipped; an unfinished one resumes from its latest checkpoint (checkpoint.resume=auto). A last checkpoint
whose evaluation was never logged is evaluated by `mom_train.eval.run_eval` instead.

Outputs in <out>: results.csv (one row per finished cell), recall_vs_state.png (recall against the decode
state of one sequence, in total and the part a token reads and writes; one panel per task) and
recall_vs_pairs.png (one panel per model width); one line per arch, mean over seeds with their min-max as
error bars. State sizes come from `mom_train.model.state_bytes`.
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
# run from a checkout without installing the package
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mom_train.config import Config, ConfigError, load_config  # noqa: E402
from mom_train.data.mqar import key_value_ranges  # noqa: E402
from mom_train.eval import run_eval  # noqa: E402
from mom_train.model import count_parameters, state_bytes  # noqa: E402
from mom_train.train import train  # noqa: E402

STUDIES = ROOT / "configs" / "studies"
GRID_KEYS = ("config", "common", "axes", "seeds")
# columns of results.csv after the axis columns
COLUMNS = ["cell", "seed", "model_arch", "d_model", "num_layers", "num_heads", "head_dim", "expand_v",
           "num_memories", "topk", "shared_memory", "seq_len", "num_pairs", "num_queries", "chance", "steps",
           "parameters", "state_bytes", "active_state_bytes", "eval_recall", "eval_loss", "train_loss",
           "train_seconds"]


@dataclass
class Grid:
    """A parsed grid file: base config path, shared overrides, axes {axis: {value: overrides}}, seeds."""
    path: Path
    config: Path
    common: list[str]
    axes: dict[str, dict[str, list[str]]]
    seeds: list[int]


@dataclass
class Cell:
    """One run of the study: a value of every axis and a seed."""
    values: dict[str, str]
    seed: int
    overrides: list[str]

    @property
    def name(self) -> str:
        return "-".join([*self.values.values(), f"s{self.seed}"])


def _overrides(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"`{where}` in the grid must be a list of section.key=value strings, got {value!r}")
    return value


def load_grid(path: str | Path) -> Grid:
    """Read and check a grid file; the base config is resolved relative to the grid file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"grid file not found: {path} (see configs/studies/ for examples)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"grid file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"grid file {path} must hold a mapping ({', '.join(GRID_KEYS)})")
    unknown = sorted(set(data) - set(GRID_KEYS))
    if unknown:
        raise ConfigError(f"unknown grid key(s) {unknown} in {path}; a grid has {', '.join(GRID_KEYS)}")
    if "config" not in data or "axes" not in data:
        raise ConfigError(f"grid {path} needs `config` (the base YAML) and `axes`")
    axes = data["axes"]
    if not isinstance(axes, dict) or "arch" not in axes:
        raise ConfigError(f"grid {path}: `axes` must be a mapping with an `arch` axis (one plotted line per arch)")
    parsed = {}
    for axis, values in axes.items():
        if not isinstance(values, dict) or not values:
            raise ConfigError(f"grid {path}: axis `{axis}` must map value names to override lists")
        parsed[str(axis)] = {str(name): _overrides(ov, f"axes.{axis}.{name}") for name, ov in values.items()}
    seeds = data.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ConfigError(f"grid {path}: `seeds` must be a non-empty list of integers, got {seeds!r}")
    return Grid(path=path, config=(path.parent / data["config"]).resolve(),
                common=_overrides(data.get("common", []), "common"), axes=parsed, seeds=seeds)


def grid_cells(grid: Grid) -> list[Cell]:
    """Every combination of axis values and seeds, in the grid file's order (seeds innermost)."""
    cells = [Cell({}, 0, [])]
    for axis, values in grid.axes.items():
        cells = [Cell({**c.values, axis: name}, 0, c.overrides + ov) for c in cells for name, ov in values.items()]
    return [Cell(c.values, seed, c.overrides) for c in cells for seed in grid.seeds]


def cell_config(grid: Grid, cell: Cell, out: Path) -> Config:
    """The cell's resolved training config; its run directory is <out>/runs/<cell name>."""
    cfg = load_config(grid.config, [*grid.common, *cell.overrides, f"run.seed={cell.seed}",
                                    f"run.dir={out / 'runs'}", f"run.name={cell.name}"])
    if cfg.data.source != "mqar":
        raise ConfigError(f"cell {cell.name}: `data.source` = {cfg.data.source!r}; the study measures MQAR recall, "
                          "set data.source=mqar")
    if cfg.eval.interval == 0:
        raise ConfigError(f"cell {cell.name}: `eval.interval` = 0 never evaluates; the study reads the recall "
                          "the trainer logs at the last step, so set eval.interval > 0 (e.g. to training.steps)")
    return cfg


def final_eval(cfg: Config) -> dict | None:
    """The evaluation the trainer logged at the run's last step (latest record wins), else the one
    `evaluate_last_checkpoint` kept, or None if neither is there."""
    path = cfg.run.path / "metrics.jsonl"
    found = None
    if path.exists():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record.get("step") == cfg.training.steps and "eval_recall" in record:
                found = record
    kept = cfg.run.path / "study_eval.json"
    if found is None and kept.exists():
        found = json.loads(kept.read_text())
    return found


def evaluate_last_checkpoint(cfg: Config) -> None:
    """The run's last checkpoint without its logged evaluation (a fault between the two): evaluate that
    checkpoint (`run_eval`, the trainer's evaluation on the same held-out stream) into <run>/study_eval.json."""
    checkpoint = cfg.run.path / "checkpoints" / f"step_{cfg.training.steps:07d}"
    if not checkpoint.is_dir():
        return
    scores = run_eval(checkpoint)
    kept = cfg.run.path / "study_eval.json"
    kept.write_text(json.dumps({"step": scores["step"], "eval_loss": scores["eval_loss"],
                                "eval_recall": scores["eval_recall"]}))


def check_same_config(cfg: Config, cell: Cell) -> None:
    """Refuse to reuse a run directory trained under a different config (the grid was edited)."""
    saved_path = cfg.run.path / "config.yaml"
    if not saved_path.exists():
        return
    saved = yaml.safe_load(saved_path.read_text())
    wanted = cfg.to_dict()
    # the output folder may be named differently (relative or absolute) between invocations
    for tree in (saved, wanted):
        tree["run"].pop("dir", None)
    if saved != wanted:
        changed = sorted(f"{section}.{key}" for section in wanted for key in wanted[section]
                         if saved.get(section, {}).get(key) != wanted[section][key])
        raise ConfigError(f"cell {cell.name}: {cfg.run.path} was trained with a different config (changed: "
                          f"{', '.join(changed)}); delete that run directory or choose another --out")


def run_cell(cfg: Config, cell: Cell, log=print) -> bool:
    """Train the cell unless it is finished; its wall time adds up in <run>/study_time.json.
    Returns False when training was preempted (the study should stop and be requeued)."""
    check_same_config(cfg, cell)
    if final_eval(cfg) is not None:
        log(f"{cell.name}: finished, skipped")
        return True
    log(f"{cell.name}: training {cfg.training.steps} steps")
    start = time.perf_counter()
    result = train(cfg)
    seconds = time.perf_counter() - start
    timing = cfg.run.path / "study_time.json"
    timing.parent.mkdir(parents=True, exist_ok=True)
    before = json.loads(timing.read_text())["train_seconds"] if timing.exists() else 0.0
    timing.write_text(json.dumps({"train_seconds": before + seconds}))
    if result.get("preempted", False):
        return False
    if final_eval(cfg) is None:
        evaluate_last_checkpoint(cfg)
    return True


def last_train_loss(cfg: Config) -> float | None:
    """The train loss of the run's last logged step."""
    losses = {}
    for line in (cfg.run.path / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            losses[record["step"]] = record["loss"]
    return losses[max(losses)] if losses else None


def result_row(cell: Cell, cfg: Config) -> dict[str, Any] | None:
    """One results.csv row for a finished cell (None if it is not finished)."""
    scores = final_eval(cfg)
    if scores is None:
        return None
    m, q = cfg.model, cfg.data.mqar
    sizes = state_bytes(m, cfg.training.seq_len)
    timing = cfg.run.path / "study_time.json"
    num_values = len(key_value_ranges(q.vocab_size)[1])
    return {**cell.values, "cell": cell.name, "seed": cell.seed, "model_arch": m.arch, "d_model": m.hidden_size,
           "num_layers": m.num_layers, "num_heads": m.num_heads, "head_dim": m.head_dim, "expand_v": m.expand_v,
           "num_memories": m.num_memories if m.arch == "mom" else "",
           "topk": m.topk if m.arch == "mom" else "",
           "shared_memory": m.shared_memory if m.arch == "mom" else "",
           "seq_len": cfg.training.seq_len, "num_pairs": q.num_pairs, "num_queries": q.num_queries,
           "chance": 1 / num_values, "steps": cfg.training.steps,
           "parameters": count_parameters(m)["total"], "state_bytes": sizes["total"],
           "active_state_bytes": sizes["active"], "eval_recall": scores["eval_recall"],
           "eval_loss": scores["eval_loss"], "train_loss": last_train_loss(cfg),
           "train_seconds": json.loads(timing.read_text())["train_seconds"] if timing.exists() else ""}


def write_csv(rows: list[dict[str, Any]], axes: list[str], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*axes, *COLUMNS])
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def seed_stats(rows: list[dict[str, Any]], x: str) -> dict[str, list[tuple]]:
    """{arch: [(x, mean, min, max) sorted by x]}: recall over seeds at each value of column x."""
    by_point: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        by_point[(r["arch"], r[x])].append(float(r["eval_recall"]))
    # archs in the order of the rows (the grid's)
    lines: dict[str, list[tuple]] = {r["arch"]: [] for r in rows}
    for (arch, xv), recalls in sorted(by_point.items(), key=lambda item: item[0][1]):
        lines[arch].append((xv, sum(recalls) / len(recalls), min(recalls), max(recalls)))
    return lines


def _kib(num_bytes: int) -> str:
    return f"{num_bytes / 1024:g} KiB"


def _panel(ax, rows: list[dict[str, Any]], x: str, xlabel: str, title: str, tick_label=str) -> None:
    """One line per arch: recall against column x (log scale), mean over seeds, min-max error bars."""
    for arch, points in seed_stats(rows, x).items():
        xs, means, lows, highs = zip(*points)
        errors = [[m - lo for m, lo in zip(means, lows)], [hi - m for m, hi in zip(means, highs)]]
        ax.errorbar(xs, means, yerr=errors, marker="o", capsize=3, label=arch)
    ax.axhline(rows[0]["chance"], color="grey", linestyle=":", linewidth=1, label="chance")
    ax.set_xscale("log", base=2)
    ticks = sorted({r[x] for r in rows})
    ax.set_xticks(ticks, [tick_label(t) for t in ticks], rotation=30)
    ax.minorticks_off()
    ax.set(xlabel=xlabel, ylabel="recall", ylim=(-0.02, 1.02), title=title)
    ax.legend(fontsize=7)


def plot(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """recall_vs_state.png (a row of panels per task) and recall_vs_pairs.png (a panel per width) in `out`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({(r["seq_len"], r["num_pairs"]) for r in rows})
    fig, axes = plt.subplots(len(tasks), 2, figsize=(11, 3.6 * len(tasks)), squeeze=False)
    for panels, (seq_len, pairs) in zip(axes, tasks):
        task_rows = [r for r in rows if (r["seq_len"], r["num_pairs"]) == (seq_len, pairs)]
        title = f"{pairs} pairs, sequence length {seq_len}"
        _panel(panels[0], task_rows, "state_bytes", "decode state per sequence", title, _kib)
        _panel(panels[1], task_rows, "active_state_bytes", "state a token reads and writes", title, _kib)
    fig.tight_layout()
    paths = [out / "recall_vs_state.png"]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    widths = sorted({r["d_model"] for r in rows})
    fig, axes = plt.subplots(1, len(widths), figsize=(5.5 * len(widths), 3.8), squeeze=False)
    for ax, width in zip(axes[0], widths):
        _panel(ax, [r for r in rows if r["d_model"] == width], "num_pairs", "key-value pairs", f"d_model {width}")
    fig.tight_layout()
    paths.append(out / "recall_vs_pairs.png")
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths


def describe(grid: Grid, cells: list[Cell], out: Path) -> None:
    """Print each cell's size: parameters and decode state (no training)."""
    for cell in cells:
        cfg = cell_config(grid, cell, out)
        sizes = state_bytes(cfg.model, cfg.training.seq_len)
        print(f"{cell.name}: {count_parameters(cfg.model)['total']:,} parameters, state {sizes['total']:,} B "
              f"(active {sizes['active']:,} B), seq_len {cfg.training.seq_len}, {cfg.data.mqar.num_pairs} pairs, "
              f"{cfg.training.steps} steps")


def parse_shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard must look like K/N (e.g. 0/8), got {text!r}") from None
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"--shard K/N needs 0 <= K < N, got {text!r}")
    return index, count


def run_processes(grid: Grid, out: Path, shard: tuple[int, int], procs: int) -> int:
    """Train this shard's cells in `procs` processes of this script at once (small models leave a GPU mostly
    idle; several processes fill it): process j takes sub-shard K*procs + j of N*procs, logging to
    <out>/logs/shard_<i>.log. Returns how many processes failed; Ctrl-C stops them all."""
    index, count = shard
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    children = []
    try:
        for sub in range(index * procs, (index + 1) * procs):
            log = open(logs / f"shard_{sub}.log", "w")
            command = [sys.executable, str(Path(__file__).resolve()), "--grid", str(grid.path), "--out", str(out),
                       "--shard", f"{sub}/{count * procs}"]
            children.append((sub, log, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)))
        print(f"{procs} processes training shards {index * procs}-{(index + 1) * procs - 1} of {count * procs}; "
              f"logs in {logs}", flush=True)
        failed = 0
        for sub, log, child in children:
            if child.wait() != 0:
                failed += 1
                print(f"shard {sub} exited with {child.returncode}: see {logs / f'shard_{sub}.log'}", flush=True)
        return failed
    finally:
        for _, log, child in children:
            if child.poll() is None:
                child.terminate()
                child.wait()
            log.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--grid", type=Path, help="grid YAML file")
    source.add_argument("--preset", help="a grid in configs/studies/: NAME reads mqar_NAME.yaml (e.g. cpu-smoke)")
    parser.add_argument("--out", type=Path, help="output folder (default runs/study_<grid name>)")
    parser.add_argument("--shard", type=parse_shard, default=(0, 1), metavar="K/N",
                        help="train only cells K, K+N, K+2N, ... (one process per GPU), then --report")
    parser.add_argument("--procs", type=int, default=1, metavar="P",
                        help="train in P processes at once (one device shared), then report")
    parser.add_argument("--list", action="store_true", help="print the cells and their sizes, train nothing")
    parser.add_argument("--report", action="store_true", help="write results and plots of finished cells only")
    args = parser.parse_args(argv)
    if args.procs < 1:
        parser.error(f"--procs must be at least 1, got {args.procs}")

    path = args.grid or STUDIES / f"mqar_{args.preset.replace('-', '_')}.yaml"
    try:
        grid = load_grid(path)
        out = args.out or Path("runs") / f"study_{grid.path.stem}"
        cells = grid_cells(grid)
        if args.list:
            describe(grid, cells, out)
            return 0
        configs = [cell_config(grid, cell, out) for cell in cells]
        if args.procs > 1 and not args.report:
            failed = run_processes(grid, out, args.shard, args.procs)
            if failed:
                print(f"{failed} of {args.procs} processes failed; rerun the same command to resume", flush=True)
                return 1
            if args.shard[1] > 1:
                print(f"shard {args.shard[0]}/{args.shard[1]} finished; run with --report once every shard has")
                return 0
        elif not args.report:
            index, count = args.shard
            for cell, cfg in list(zip(cells, configs))[index::count]:
                if not run_cell(cfg, cell):
                    print("preempted: rerun the same command to resume", flush=True)
                    return 0
            if count > 1:
                # shards finish at different times: one --report writes the results once they all have
                print(f"shard {index}/{count} finished; run with --report once every shard has")
                return 0
        rows = [row for cell, cfg in zip(cells, configs) if (row := result_row(cell, cfg)) is not None]
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_csv(rows, list(grid.axes), out / "results.csv")
    print(f"{len(rows)} of {len(cells)} cells finished: {out / 'results.csv'}")
    if rows:
        for figure in plot(rows, out):
            print(f"wrote {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
