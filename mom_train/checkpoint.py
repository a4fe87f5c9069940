"""Save and resume the full train state, atomically, with keep-last-k and a `latest` pointer.

Layout under the run dir (`cfg.run.path`):

    latest                                  text: "checkpoints/step_0000100" (only ever a complete checkpoint)
    checkpoints/step_0000100/model.pt       model state_dict (rank 0; replicas are identical under DDP)
                            optimizer.pt    AdamW state (rank 0)
                            train_state.pt  step, tokens, LR schedule, counters, dp_size (rank 0)
                            rank_00000.pt   per dp rank: data loader state and RNG (python, numpy, torch, cuda);
                                            rank_00000_cp001.pt ... for the other ranks of a cp group
                                            (the tp ranks of a group share data and RNG: tp rank 0 writes)
                            config.yaml     the resolved config

A checkpoint may also hold model weights only (`save_weights_only`, e.g. an imported Hugging Face model): step
0 with model.pt, config.yaml and a train_state marked `weights_only`, no optimizer or rank files.

A checkpoint is written into `checkpoints/.tmp_step_0000100`, every file fsynced, the directory fsynced, then
renamed into place; only after that is `latest.tmp` written, fsynced and renamed over `latest`. A crash at
any point leaves the previous checkpoint and pointer intact. A torch.save cut short (a full disk) is raised
as an OSError naming the file.

Reading verifies: `find_resume` reads every file a rank needs and checks the config against the run before
anything is written; a checkpoint that cannot be read (or an unusable `latest`) is skipped for the next
newest with a note, and every rank resumes from the same one. `PreemptionHandler` turns SIGTERM/SIGINT into
a flag that the loop checks once per step.
"""
from __future__ import annotations

import dataclasses
import os
import random
import re
import shutil
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mom_train.config import Config, ConfigError, load_config, to_yaml
from mom_train.errors import CheckpointError, write_error
from mom_train.parallel.dims import ParallelDims, resolve_device
from mom_train.model import build_model

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
# train_state key of a checkpoint that holds model weights only
WEIGHTS_ONLY = "weights_only"
_STEP_RE = re.compile(r"^step_(\d{7,})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def rank_file(dp_rank: int, cp_rank: int = 0) -> str:
    """A rank's data/RNG file: rank_DDDDD.pt for the first rank of each data-parallel group, rank_DDDDD_cpCCC.pt
    for the others of a context-parallel group (same data state, their own RNG)."""
    return f"rank_{dp_rank:05d}.pt" if cp_rank == 0 else f"rank_{dp_rank:05d}_cp{cp_rank:03d}.pt"


# ---------------------------------------------------------------------------------------------------- rng


def rng_state() -> dict[str, Any]:
    """RNG state of this process: python, numpy, torch CPU and every CUDA device."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -------------------------------------------------------------------------------------------------- write


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: Path, obj: Any) -> None:
    """torch.save + flush + fsync; a write cut short (full disk) raises OSError."""
    with open(path, "wb") as f:
        try:
            torch.save(obj, f)
        except RuntimeError as e:
            raise write_error(e, path) from None
        f.flush()
        os.fsync(f.fileno())


def _write_text(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(run_dir: Path, step: int, main_state: dict[str, Any], rank_state: dict[str, Any],
                    cfg: Config, dims: ParallelDims, keep: int) -> Path:
    """Write checkpoint `step` collectively (every rank calls this) and return its directory.

    main_state: {file stem: object} written by rank 0 (model, optimizer, train_state).
    rank_state: this rank's {"data": loader state, "rng": rng_state()}, written as rank_XXXXX.pt by the first
    rank of each tensor-parallel group.
    If any rank fails, no rank commits: the error is raised everywhere and `latest` is unchanged.
    """
    root = run_dir / CHECKPOINT_DIR
    final = root / step_dir_name(step)
    tmp = root / f".tmp_{step_dir_name(step)}"
    if dims.is_main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp_*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    dims.barrier()
    error: BaseException | None = None
    try:
        if dims.tp_rank == 0:
            _write(tmp / rank_file(dims.dp_rank, dims.cp_rank), rank_state)
        if dims.is_main:
            for stem, obj in main_state.items():
                _write(tmp / f"{stem}.pt", obj)
            _write_text(tmp / "config.yaml", to_yaml(cfg))
    except Exception as e:  # noqa: BLE001 - re-raised below after every rank agreed
        error = e
    if dims.max_int(int(error is not None)):
        if dims.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if error is not None:
            raise error
        raise RuntimeError(f"checkpoint step {step} failed on another rank; nothing was committed")
    if dims.is_main:
        _commit(tmp, final, run_dir)
        _prune(root, keep, final)
    dims.barrier()
    return final


def save_weights_only(run_dir: Path, model_state: dict[str, torch.Tensor], cfg: Config, source: str) -> Path:
    """Write checkpoint step 0 of a run holding model weights only (e.g. imported from another framework):
    model.pt, config.yaml and a train_state marked `weights_only`, which the trainer resumes from with a fresh
    optimizer, schedule, data stream and RNG. Same atomic layout and `latest` pointer as `save_checkpoint`."""
    root = run_dir / CHECKPOINT_DIR
    final = root / step_dir_name(0)
    tmp = root / f".tmp_{step_dir_name(0)}"
    root.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    _write(tmp / "model.pt", model_state)
    _write(tmp / "train_state.pt", {"step": 0, "tokens": 0, "skipped_steps": 0, WEIGHTS_ONLY: True,
                                    "source": source})
    _write_text(tmp / "config.yaml", to_yaml(cfg))
    _commit(tmp, final, run_dir)
    return final


def _commit(tmp: Path, final: Path, run_dir: Path) -> None:
    """Publish a fully written checkpoint directory: durable `tmp` renamed to `final`, then the `latest`
    pointer replaced atomically to name it (each step fsynced, so a crash leaves the old or the new state)."""
    _fsync_dir(tmp)
    if final.exists():
        # the same step saved by an earlier attempt of this run: the new one supersedes it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    pointer = run_dir / LATEST
    _write_text(pointer.with_name(LATEST + ".tmp"), f"{CHECKPOINT_DIR}/{final.name}\n")
    os.replace(pointer.with_name(LATEST + ".tmp"), pointer)
    _fsync_dir(run_dir)


def is_weights_only(path: Path) -> bool:
    """Whether a checkpoint holds model weights only (`save_weights_only`): no optimizer, data or RNG state."""
    return bool(load_main(path, "train_state").get(WEIGHTS_ONLY, False))


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = run_dir / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def _prune(root: Path, keep: int, newest: Path) -> None:
    """Delete all but the `keep` newest checkpoints (never `newest`)."""
    ckpts = list_checkpoints(root.parent)
    for old in ckpts[:-keep]:
        if old != newest:
            shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------------- read


def _pointed(run_dir: Path) -> Path | None:
    """The checkpoint `latest` names, if the pointer is readable and names a step directory of this run."""
    try:
        name = (run_dir / LATEST).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    target = run_dir / name
    if not name or not _STEP_RE.match(target.name) or target.parent != run_dir / CHECKPOINT_DIR:
        return None
    return target if target.is_dir() else None


def candidate_checkpoints(run_dir: Path) -> list[Path]:
    """A run's checkpoints in order of preference: the one `latest` names, then the others newest first."""
    pointed = _pointed(run_dir)
    rest = [p for p in reversed(list_checkpoints(run_dir)) if p != pointed]
    return ([pointed] if pointed is not None else []) + rest


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint `latest` names, else the newest complete one, else None."""
    found = candidate_checkpoints(run_dir)
    return found[0] if found else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory, or a run directory (its latest checkpoint); CheckpointError with a fix otherwise."""
    return resolve_candidates(path)[0]


def resolve_candidates(path: str | os.PathLike) -> list[Path]:
    """[the checkpoint dir] for a checkpoint dir, a run dir's checkpoints in order of preference, or
    CheckpointError naming what was expected."""
    p = Path(path)
    if (p / "train_state.pt").is_file():
        return [p]
    found = candidate_checkpoints(p) if p.is_dir() else []
    if found:
        return found
    what = "has no checkpoint yet (train first, or" if p.is_dir() else "does not exist (check the path, or"
    raise CheckpointError(f"{p} {what} give a checkpoints/step_XXXXXXX directory with train_state.pt, or a run "
                          "directory that has one)")


def resume_candidates(cfg: Config) -> list[Path]:
    """The checkpoints checkpoint.resume allows, in order of preference: for auto this run's (newest first;
    none for a fresh run), for none nothing, else the one named (ConfigError if there is none)."""
    mode = cfg.checkpoint.resume
    if mode == "none":
        return []
    if mode == "auto":
        return candidate_checkpoints(cfg.run.path)
    try:
        return resolve_candidates(mode)[:1]
    except CheckpointError as e:
        raise ConfigError(f"`checkpoint.resume` = {mode!r}: {e}; or use auto / none") from None


def checkpoint_config(path: Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The resolved config stored in a checkpoint, with optional overrides, for use in one process (its
    tensor/context-parallel sizes reset to 1: they split the work, not the model, whose checkpoint is whole)."""
    file = path / "config.yaml"
    if not file.is_file():
        raise CheckpointError(f"{file} is missing; the checkpoint is incomplete")
    return load_config(file, ["parallel.tp=1", "parallel.cp=1", *overrides], world_size=1)


def _saved_config(path: Path) -> Config:
    """The checkpoint's own config; CheckpointError when it cannot be read (a broken checkpoint)."""
    try:
        return checkpoint_config(path)
    except ConfigError as e:
        raise CheckpointError(f"{path / 'config.yaml'} is unreadable ({e})") from None


def check_compatible(path: Path, cfg: Config, dims: ParallelDims) -> None:
    """Refuse to resume when the model config or the data- or context-parallel size changed; name what
    changed. The tensor-parallel size, the ZeRO stage and the engine may change (the checkpoint holds the whole
    model and optimizer)."""
    saved = _saved_config(path)
    old, new = dataclasses.asdict(saved.model), dataclasses.asdict(cfg.model)
    changed = [f"model.{k}: {old.get(k)!r} in the checkpoint, {new.get(k)!r} now"
               for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if changed:
        raise ConfigError(f"cannot resume from {path}: the model config changed ({'; '.join(changed)}). "
                          "Restore those values, or start fresh with checkpoint.resume=none / a new run.name")
    if is_weights_only(path):
        # no per-rank data or RNG state: any layout starts afresh from it
        return
    num_ranks = len(list(path.glob("rank_[0-9][0-9][0-9][0-9][0-9].pt")))
    num_cp = 1 + len(list(path.glob("rank_00000_cp*.pt")))
    if num_ranks == 0:
        raise CheckpointError(f"{path} has no rank_XXXXX.pt file; the checkpoint is incomplete")
    if (num_ranks, num_cp) != (dims.dp_size, dims.cp_size):
        raise ConfigError(f"cannot resume from {path}: it was written by {num_ranks} data-parallel rank(s) x "
                          f"{num_cp} context-parallel rank(s), this run has dp_size={dims.dp_size} x "
                          f"cp_size={dims.cp_size}. Resharding the data-loader and RNG state is not supported; "
                          f"relaunch with {num_ranks * num_cp} process(es) and parallel.cp={num_cp}, or start "
                          "fresh with checkpoint.resume=none")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _load(file: Path, map_location: str | torch.device = "cpu") -> Any:
    """torch.load of one checkpoint file; CheckpointError naming the file and why it cannot be read."""
    if not file.is_file():
        raise CheckpointError(f"{file} is missing; the checkpoint is incomplete")
    try:
        return torch.load(file, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - any failure to unpickle means a damaged file
        raise CheckpointError(f"{file} is unreadable, truncated or corrupt ({_first_line(e)})") from None


def load_main(path: Path, stem: str, map_location: str | torch.device = "cpu") -> Any:
    """One rank-0 file of a checkpoint (model, optimizer, train_state)."""
    return _load(path / f"{stem}.pt", map_location)


def load_rank(path: Path, dp_rank: int, cp_rank: int = 0) -> dict[str, Any]:
    return _load(path / rank_file(dp_rank, cp_rank))


@dataclasses.dataclass
class ResumeState:
    """Everything a rank resumes from, read and checked: the rank-0 files and this rank's data/RNG file."""
    path: Path
    model: dict[str, Any]
    optimizer: Any
    train_state: dict[str, Any]
    rank: dict[str, Any] | None
    # model weights only (`save_weights_only`): optimizer, schedule, data stream and RNG start fresh
    weights_only: bool = False


def load_resume_state(path: Path, cfg: Config, dims: ParallelDims) -> ResumeState:
    """Read and verify one checkpoint for this rank. ConfigError when the run changed (model, ranks);
    CheckpointError when a file is missing or cannot be read."""
    check_compatible(path, cfg, dims)
    train_state = load_main(path, "train_state")
    if not isinstance(train_state, dict) or "step" not in train_state:
        raise CheckpointError(f"{path / 'train_state.pt'} holds no train state; the checkpoint is corrupt")
    if train_state.get(WEIGHTS_ONLY, False):
        return ResumeState(path, load_main(path, "model"), None, train_state, None, weights_only=True)
    return ResumeState(path, load_main(path, "model"), load_main(path, "optimizer"),
                       train_state, load_rank(path, dims.dp_rank, dims.cp_rank))


def find_resume(cfg: Config, dims: ParallelDims, note: Callable[[str], None]) -> ResumeState | None:
    """The newest checkpoint checkpoint.resume allows that every rank can load (None: start fresh). A broken
    one is skipped with a note naming it and why; ConfigError when the run no longer fits its checkpoints,
    CheckpointError when none of them can be loaded."""
    candidates = resume_candidates(cfg)
    skipped = []
    for path in candidates:
        error: CheckpointError | None = None
        try:
            state = load_resume_state(path, cfg, dims)
        except CheckpointError as e:
            error = e
        # every rank resumes from the same checkpoint: one that fails anywhere is skipped everywhere
        if not dims.max_int(int(error is not None)):
            return state
        reason = str(error) if error is not None else "unreadable on another rank"
        skipped.append(f"{path.name}: {reason}")
        note(f"note: skipped checkpoint {path}: {reason}")
    if not candidates:
        return None
    raise CheckpointError(f"no checkpoint of {cfg.run.path} can be loaded ({'; '.join(skipped)}). Restore the "
                          "files, or start fresh with checkpoint.resume=none or a new run.name")


def load_model(path: Path, cfg: Config, device: torch.device) -> nn.Module:
    """The checkpoint's model (built from cfg.model), on `device`, in eval mode."""
    model = build_model(cfg.model)
    try:
        model.load_state_dict(load_main(path, "model"))
    except RuntimeError as e:
        raise CheckpointError(f"the weights in {path} do not fit the model config ({_first_line(e)}); leave the "
                              "model.* keys as the checkpoint has them") from None
    return model.to(device).eval()


def open_checkpoint(checkpoint: str | os.PathLike, overrides: list[str] | tuple[str, ...] = (),
                    note: Callable[[str], None] = print) -> tuple[Path, Config, nn.Module]:
    """(checkpoint dir, its config with `overrides`, its model in eval mode on the config's device) for eval
    and generation. Given a run directory, a checkpoint that cannot be loaded is skipped for the next newest,
    with a note."""
    def open_one(path: Path) -> tuple[Path, Config, nn.Module]:
        # a damaged config.yaml is the checkpoint's fault (CheckpointError), a bad override the user's
        _saved_config(path)
        cfg = checkpoint_config(path, overrides)
        return path, cfg, load_model(path, cfg, resolve_device(cfg))

    *earlier, last = resolve_candidates(checkpoint)
    for path in earlier:
        try:
            return open_one(path)
        except CheckpointError as e:
            note(f"note: skipped checkpoint {path}: {e}")
    return open_one(last)


# ----------------------------------------------------------------------------------------------- signals


class PreemptionHandler:
    """Context manager: SIGTERM/SIGINT set `requested` instead of killing the process.

    The loop reads the flag once per step and agrees on it across ranks. A second signal of the same kind
    restores the default behaviour (so a stuck run can still be interrupted). Outside the main thread
    (where Python cannot install handlers) it is inert.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == self.signum:
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
        self.requested, self.signum = True, signum

    def __enter__(self) -> PreemptionHandler:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
