"""Training metrics: a device-side window accumulator, metrics.jsonl, a rank-0 progress bar, wandb, MFU, plots.

Per step the loop adds device tensors to a `Window` (no host sync); every `logging.interval` steps
`Window.reduce` all-reduces them in one collective and reads them back in one `.tolist()`. `MetricsLogger`
writes one JSON object per record to `<run dir>/metrics.jsonl` (rank 0), updates the progress bar and, when
`logging.wandb` is offline/online, mirrors scalars to wandb (imported lazily).
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mom_train.config import Config, ConfigError
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


class MetricsLogger:
    """Rank-0 sink for metric records: metrics.jsonl, progress bar (tqdm if installed), optional wandb."""

    def __init__(self, cfg: Config, dims: ParallelDims, start_step: int):
        self.enabled = dims.is_main
        self.total = cfg.training.steps
        self.start_step = start_step
        self.start_time = time.perf_counter()
        self.path = cfg.run.path / "metrics.jsonl"
        self.bar = None
        self.wandb = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a")
        if cfg.logging.progress_bar:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=self.total, initial=start_step, desc="train", dynamic_ncols=True,
                                file=sys.stderr)
            except ImportError:
                self.bar = None
        if cfg.logging.wandb != "disabled":
            self.wandb = _init_wandb(cfg)

    def advance(self, step: int) -> None:
        """Move the progress bar to `step` (no sync)."""
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = _clean(record)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log(_flat_scalars(record), step=record["step"])
        if "loss" in record:
            self._show(record)

    def message(self, text: str) -> None:
        """A line for the console that does not break the progress bar (rank 0 only)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def _show(self, r: dict[str, Any]) -> None:
        loss = "nan" if r["loss"] is None else f"{r['loss']:.4f}"
        parts = {"loss": loss, "lr": f"{r['lr']:.2e}", "tok/s": f"{r['tokens_per_s']:.3g}"}
        if self.bar is not None:
            self.bar.set_postfix(parts, refresh=False)
            return
        done = r["step"] - self.start_step
        elapsed = time.perf_counter() - self.start_time
        eta = elapsed / done * (self.total - r["step"]) if done else math.nan
        print(f"step {r['step']}/{self.total} " + " ".join(f"{k} {v}" for k, v in parts.items())
              + f" eta {eta:.0f}s", flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()
        self.file.close()


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
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}; pass a run directory (<run.dir>/<run.name>)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write loss.png, lr.png and throughput.png into the run dir from its metrics.jsonl; return the paths."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("plotting needs matplotlib: pip install matplotlib (or pip install -e .[plot])") from None
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    train = [r for r in records if r.get("loss") is not None]
    evals = [r for r in records if r.get("eval_loss") is not None]
    curves = {
        "loss.png": [("train loss", train, "loss"), ("eval loss", evals, "eval_loss")],
        "lr.png": [("learning rate", train, "lr")],
        "throughput.png": [("tokens/s", train, "tokens_per_s")],
    }
    written = []
    for name, series in curves.items():
        fig, ax = plt.subplots(figsize=(7, 4))
        for label, rows, key in series:
            if rows:
                ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=label)
        ax.set_xlabel("step")
        ax.set_ylabel(series[0][0])
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(run_dir / name, dpi=100)
        plt.close(fig)
        written.append(run_dir / name)
    return written
