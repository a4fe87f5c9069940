"""Where parallelism lives: the model stays plain PyTorch (no process groups), kernels never reach up into
the model, and megatron-core's CPU workaround is one scoped function that leaves torch itself alone."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

PACKAGE = Path(__file__).resolve().parents[2] / "mom_train"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("folder, forbidden", [
    ("model", ("torch.distributed", "mom_train.parallel", "megatron")),
    ("kernels", ("mom_train.model", "mom_train.parallel")),
])
def test_layers_do_not_import_upwards(folder, forbidden):
    offenders = {str(p.relative_to(PACKAGE)): sorted(n for n in _imports(p) if n.startswith(forbidden))
                 for p in (PACKAGE / folder).rglob("*.py")}
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"{folder}/ must not import {forbidden}: {offenders}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only path")
def test_megatron_cpu_workaround_is_scoped_to_one_module(monkeypatch):
    from megatron.core.tensor_parallel import mappings

    from mom_train.parallel.tensor import megatron_on_cpu

    monkeypatch.setattr(mappings, "torch", torch)
    # where CUDA exists it does nothing
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert megatron_on_cpu() is False and mappings.torch is torch
    monkeypatch.undo()
    monkeypatch.setattr(mappings, "torch", torch)
    assert megatron_on_cpu() is True
    view = mappings.torch
    # megatron's sequence-parallel buffers land on the CPU; everything else is torch's own
    assert view.cuda.current_device() == "cpu" and view.empty is torch.empty and view.distributed is torch.distributed
    assert megatron_on_cpu() is True and mappings.torch is view
    # torch itself is untouched
    with pytest.raises((AssertionError, RuntimeError)):
        torch.cuda.current_device()
