"""Training metrics: a device-side window accumulator, metrics.jsonl, a rank-0 progress bar, wandb, MFU, plots.

Per step the loop adds device tensors to a `Window` (no host sync); every `logging.interval` steps
`Window.reduce` all-reduces them in one collective and reads them back in one `.tolist()`. `MetricsLogger`
writes one JSON object per record to `<run dir>/metrics.jsonl` (rank 0), updates the progress bar and, when
`logging.wandb` is offline/online, mirrors scalars to wandb (imported lazily).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mom_train.config import Config, ConfigError
from mom_train.errors import UserError
from mom_train.parallel.dims import ParallelDims

# dense bf16 tensor-core peak FLOP/s per device, matched by substring of torch.cuda.get_device_name
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "H800": 989e12,
    "GH200": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "4090": 165e12,
}


def peak_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of a CUDA device from the table above; None if unknown or not CUDA."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in name:
            return flops
    return None


def run_header(cfg: Config, dims: ParallelDims, model: torch.nn.Module) -> str:
    """The lines printed before the progress bar: device, parameter count, run dir and the task."""
    from mom_train.data.mqar import describe_task

    device = str(dims.device)
    if dims.device.type == "cuda":
        device += f" ({torch.cuda.get_device_name(dims.device)})"
    else:
        device += f" ({torch.get_num_threads()} threads)"
    if dims.world_size > 1:
        device += f" x {dims.world_size} ranks"
    num_params = sum(p.numel() for p in model.parameters())
    task = describe_task(cfg.data.mqar) if cfg.data.source == "mqar" else f"text from data.source {cfg.data.source}"
    return "\n".join([f"device:     {device}",
                      f"model:      {cfg.model.arch}, {num_params:,} parameters",
                      f"run dir:    {cfg.run.path}",
                      f"task:       {task}",
                      f"steps:      {cfg.training.steps:,}"])


class Window:
    """Sums of per-step device tensors between two logging steps.

    A step whose loss or gradient was not finite (skipped by the optimizer) contributes to `num_skipped` but
    not to loss, aux loss or grad norm, so one bad step does not turn the window's averages into NaN.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        zero = torch.zeros((), device=self.device, dtype=torch.float64)
        self.loss_sum = zero.clone()
        self.num_valid = zero.clone()
        self.aux_loss = zero.clone()
        self.grad_norm = zero.clone()
        self.num_skipped = zero.clone()
        self.router_load: torch.Tensor | None = None
        self.num_steps = 0

    def add(self, loss_sum: torch.Tensor, num_valid: int, aux_loss: torch.Tensor, router_load: torch.Tensor | None,
            grad_norm: torch.Tensor, nonfinite: torch.Tensor) -> None:
        """One optimizer step. loss_sum: this rank's summed CE (scalar); num_valid: GLOBAL valid targets;
        aux_loss: mean over micro-batches (scalar); router_load [L, E] mean over micro-batches or None;
        grad_norm, nonfinite: scalars, equal on every rank."""
        bad = nonfinite.bool()
        zero = torch.zeros((), device=self.device, dtype=torch.float64)
        self.loss_sum += torch.where(bad, zero, loss_sum.double())
        self.num_valid += torch.where(bad, zero, zero + num_valid)
        self.aux_loss += torch.where(bad, zero, aux_loss.double())
        self.grad_norm += torch.where(bad, zero, grad_norm.double())
        self.num_skipped += nonfinite.double()
        if router_load is not None:
            load = router_load.detach().double()
            self.router_load = load if self.router_load is None else self.router_load + load
        self.num_steps += 1

    def reduce(self, dims: ParallelDims) -> dict[str, Any]:
        """All-reduce and read back (the one host sync of a logging interval); then reset."""
        parts = [self.loss_sum.view(1), self.aux_loss.view(1)]
        if self.router_load is not None:
            parts.append(self.router_load.flatten())
        # every rank holds a distinct part of the step's tokens (data, context and tensor parallelism)
        summed = dims.all_reduce_(torch.cat(parts))
        local = torch.stack([self.num_valid, self.grad_norm, self.num_skipped])
        values, (num_valid, grad_norm, num_skipped) = summed.tolist(), local.tolist()
        good = self.num_steps - num_skipped
        out: dict[str, Any] = {
            "loss": values[0] / num_valid if num_valid else math.nan,
            # the cp and tp ranks of a replica each hold a share of their sequence's aux loss
            "aux_loss": values[1] / dims.dp_size / good if good else math.nan,
            "grad_norm": grad_norm / good if good else math.nan,
            "skipped_steps": int(num_skipped),
        }
        if self.router_load is not None:
            shape = self.router_load.shape
            # every rank reports its replica's load
            load = torch.tensor(values[2:], dtype=torch.float64).view(shape) / (dims.world_size * self.num_steps)
            out["router_load"] = [[round(x, 4) for x in row] for row in load.tolist()]
        self.reset()
        return out


def _clean(value: Any) -> Any:
    """JSON-safe: non-finite floats become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class Eta:
    """Remaining wall time from the steps so far: step time measured from the end of the first step (which pays
    for warm-up), plus the evaluations and checkpoints still to come at their last measured cost."""

    def __init__(self, total: int, eval_interval: int, checkpoint_interval: int):
        self.total = total
        # steps between evaluations / checkpoints; the last step evaluates (if any do) and always saves
        self.intervals = {"eval": (eval_interval, eval_interval > 0), "checkpoint": (checkpoint_interval, True)}
        self.costs: dict[str, float] = {}
        self.start: tuple[int, float] | None = None
        self.paused = 0.0
        self.step = 0

    def advance(self, step: int) -> None:
        self.step = step
        if self.start is None:
            self.start = (step, time.perf_counter())

    def pause(self, kind: str, seconds: float) -> None:
        """`seconds` spent on an evaluation or a checkpoint ("eval", "checkpoint"), not on steps."""
        self.costs[kind] = seconds
        self.paused += seconds

    def seconds(self) -> float | None:
        """Estimated seconds to the end; None until two steps after the first were timed."""
        if self.start is None or self.step - self.start[0] < 2:
            return None
        first, t0 = self.start
        per_step = (time.perf_counter() - t0 - self.paused) / (self.step - first)
        left = (self.total - self.step) * per_step
        for kind, cost in self.costs.items():
            every, at_end = self.intervals[kind]
            count = self.total // every - self.step // every if every > 0 else 0
            if at_end and self.step < self.total and (every <= 0 or self.total % every):
                count += 1
            left += cost * count
        return max(left, 0.0)


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def repair_metrics(path: Path, start_step: int) -> str | None:
    """Make metrics.jsonl describe the run as it resumes at `start_step`: drop a line cut by a crash (or any
    line that is not a JSON record) and the records of steps after `start_step`, which the resumed run logs
    again. Rewritten atomically; returns a note saying what was dropped, or None."""
    if not path.is_file():
        return None
    kept, num_bad, num_replayed = [], 0, 0
    for line in path.read_bytes().splitlines(keepends=True):
        record = _parse(line)
        if record is None or not line.endswith(b"\n"):
            num_bad += bool(line.strip())
            continue
        if record.get("step", 0) > start_step:
            num_replayed += 1
            continue
        kept.append(line)
    if not (num_bad or num_replayed):
        return None
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(b"".join(kept))
    os.replace(tmp, path)
    parts = ([f"{num_bad} cut or unreadable line(s)"] if num_bad else []) + (
        [f"{num_replayed} record(s) of steps after {start_step}, which are logged again"] if num_replayed else [])
    return f"note: {path}: dropped " + " and ".join(parts)


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


SKIP_NAMES = {"skipped_bad_json": "bad JSON records", "skipped_empty": "empty records",
              "skipped_bad_utf8": "records with bad UTF-8", "truncated_files": "truncated files",
              "skipped_bad_files": "unreadable files"}


class MetricsLogger:
    """Rank-0 sink for metric records: metrics.jsonl, progress bar (tqdm if installed), optional wandb.

    Each record is appended with one write of its whole line; a write that fails (a full disk) is cut back
    off the file before the error is raised, and a line cut by a crash is dropped at the next resume."""

    def __init__(self, cfg: Config, dims: ParallelDims, start_step: int):
        self.enabled = dims.is_main
        self.total = cfg.training.steps
        self.start_step = start_step
        self.eta = Eta(self.total, cfg.eval.interval, cfg.checkpoint.interval)
        self.path = cfg.run.path / "metrics.jsonl"
        self.bar = None
        self.wandb = None
        self.skipped: dict[str, int] = {}
        # the latest loss / lr / tokens-per-second shown next to the remaining time
        self.parts: dict[str, str] = {}
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        note = repair_metrics(self.path, start_step)
        if note:
            print(note, flush=True)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if cfg.logging.progress_bar:
            try:
                from tqdm import tqdm
                # remaining time comes from Eta (in the postfix): tqdm's own counts the first step's warm-up
                self.bar = tqdm(total=self.total, initial=start_step, desc="train", dynamic_ncols=True,
                                file=sys.stderr, bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")
            except ImportError:
                self.bar = None
        if cfg.logging.wandb != "disabled":
            self.wandb = _init_wandb(cfg)

    def advance(self, step: int) -> None:
        """Move the progress bar to `step` (no sync)."""
        self.eta.advance(step)
        if self.bar is not None:
            self.bar.set_postfix_str(self._postfix(), refresh=False)
            self.bar.update(step - self.bar.n)

    def pause(self, kind: str, seconds: float) -> None:
        """Time spent on an evaluation or a checkpoint (for the remaining-time estimate)."""
        self.eta.pause(kind, seconds)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = _clean(record)
        self._append((json.dumps(record) + "\n").encode())
        if self.wandb is not None:
            self.wandb.log(_flat_scalars(record), step=record["step"])
        if "loss" in record:
            self._show(record)
        if isinstance(record.get("data"), dict):
            self._report_skips(record["data"])

    def _append(self, line: bytes) -> None:
        size = os.fstat(self.fd).st_size
        try:
            written = os.write(self.fd, line)
            if written != len(line):
                # a short write without an error: the next one reports the cause (e.g. ENOSPC)
                os.write(self.fd, line[written:])
        except OSError as e:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, size)
            raise OSError(e.errno, e.strerror, str(self.path)) from e

    def _report_skips(self, stats: dict[str, Any]) -> None:
        """A console line whenever the data stream skipped more records or files since the last record."""
        grown = {k: stats[k] for k in SKIP_NAMES if stats.get(k, 0) > self.skipped.get(k, 0)}
        if not grown:
            return
        self.skipped.update(grown)
        counts = ", ".join(f"{stats[k]} {name}" for k, name in SKIP_NAMES.items() if stats.get(k))
        self.message(f"data: skipped so far: {counts} (the stream goes on; counts in metrics.jsonl)")

    def message(self, text: str) -> None:
        """A line for the console that does not break the progress bar (rank 0 only)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def _postfix(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in [*self.parts.items(), ("eta", format_seconds(self.eta.seconds()))])

    def _show(self, r: dict[str, Any]) -> None:
        loss = "nan" if r["loss"] is None else f"{r['loss']:.4f}"
        self.parts = {"loss": loss, "lr": f"{r['lr']:.2e}", "tok/s": f"{r['tokens_per_s']:.3g}"}
        if self.bar is not None:
            self.bar.set_postfix_str(self._postfix(), refresh=False)
            return
        print(f"step {r['step']}/{self.total} " + " ".join(f"{k} {v}" for k, v in self.parts.items())
              + f" eta {format_seconds(self.eta.seconds())}", flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()
        os.close(self.fd)


def _init_wandb(cfg: Config) -> Any:
    try:
        import wandb
    except ImportError:
        raise ConfigError(f"`logging.wandb` = {cfg.logging.wandb!r} needs the wandb package: pip install wandb "
                          "(or set logging.wandb=disabled)") from None
    return wandb.init(project=cfg.logging.wandb_project, name=cfg.run.name, dir=str(cfg.run.path),
                      mode=cfg.logging.wandb, config=cfg.to_dict(), resume="allow")


def _flat_scalars(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numbers of a record for wandb; router_load [L][E] becomes router_load/layer{i}/mem{j}."""
    out: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, (int, float)):
            out[name] = value
        elif isinstance(value, dict):
            out.update(_flat_scalars(value, name + "/"))
        elif key == "router_load":
            for i, row in enumerate(value):
                for j, x in enumerate(row):
                    out[f"{name}/layer{i}/mem{j}"] = x
    return out


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl. A line cut by a crash (or otherwise unreadable) is skipped; of
    records logged twice for one step (steps replayed after a crash), the last is kept."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"no metrics.jsonl in {run_dir}; pass a run directory (<run.dir>/<run.name>)")
    latest: dict[tuple[int, bool], dict[str, Any]] = {}
    for line in path.read_bytes().splitlines():
        record = _parse(line)
        if record is not None and "step" in record:
            # a step has one training record and one evaluation record at most
            latest[(record["step"], any(k.startswith("eval_") for k in record))] = record
    return [latest[key] for key in sorted(latest)]


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write loss.png, lr.png, throughput.png and (MQAR) recall.png into the run dir from its metrics.jsonl;
    return the paths. Evaluations are drawn as points with markers, so a single one shows."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install matplotlib (or pip install -e .[plot])") from None
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    train = [r for r in records if r.get("loss") is not None]
    evals = [r for r in records if r.get("eval_loss") is not None]
    recalls = [r for r in records if r.get("eval_recall") is not None]
    curves = {
        "loss.png": [("train loss", train, "loss", "-"), ("eval loss", evals, "eval_loss", "o-")],
        "lr.png": [("learning rate", train, "lr", "-")],
        "throughput.png": [("tokens/s", train, "tokens_per_s", "-")],
    }
    if recalls:
        curves["recall.png"] = [("eval recall", recalls, "eval_recall", "o-")]
    written = []
    for name, series in curves.items():
        fig, ax = plt.subplots(figsize=(7, 4))
        for label, rows, key, style in series:
            if rows:
                ax.plot([r["step"] for r in rows], [r[key] for r in rows], style, label=label)
        ax.set_xlabel("step")
        ax.set_ylabel(series[0][0])
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(run_dir / name, dpi=100)
        plt.close(fig)
        written.append(run_dir / name)
    return written
