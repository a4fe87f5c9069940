"""fla 0.6.0's own forward on our fla-format exports, on the CPU: run as a script under the Triton interpreter
(TRITON_INTERPRET=1, see tests/kernels/interpreter.py); prints {case: relative error of fla's logits} as JSON.

Two things are patched in this process only: Triton's autotuner takes each kernel's first config (the
interpreter has no device to time configs on), and `Tensor.argsort` is stable, because fla's MoM lays its
memory streams out with an unstable argsort, which reorders tokens inside a stream whenever torch's sort is
unstable (on the CPU at these sizes) and then gives wrong logits. fla runs in eval mode: in training mode its
MoM short convs run across stream boundaries.
"""
from __future__ import annotations

import json
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import triton.runtime.autotuner as autotuner

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mom_train.checkpoint import load_model  # noqa: E402
from mom_train.hf import export_checkpoint  # noqa: E402
from tests.hf.helpers import random_checkpoint, tiny_config  # noqa: E402

# (case, arch, overrides, batch, length). In eval mode fla runs inputs of up to 64 tokens through its
# fused recurrent kernels; its chunked kernels (longer inputs) stop the interpreter (an int meets `.to`) and
# are checked on the GPU only
CASES = [("mom", "mom", [], 2, 16),
         ("mom-no-shared-untied", "mom", ["model.shared_memory=false", "model.tie_embeddings=false"], 1, 12),
         ("gated_deltanet", "gated_deltanet", [], 2, 16)]


def first_config_run(self, *args, **kwargs):
    """Autotuner.run with the first config, no timing."""
    self.nargs = dict(zip(self.arg_names, args))
    config = self.configs[0]
    if config.pre_hook is not None:
        config.pre_hook({**self.nargs, **kwargs, **config.all_kwargs()})
    return self.fn.run(*args, **kwargs, **config.all_kwargs())


def main() -> None:
    autotuner.Autotuner.run = first_config_run
    argsort = torch.Tensor.argsort
    torch.Tensor.argsort = lambda self, *a, **k: argsort(self, *a, **{**k, "stable": True})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import fla  # noqa: F401 (registers fla's classes with transformers)
        from transformers import AutoModelForCausalLM
    torch.set_num_threads(1)
    errors = {}
    with tempfile.TemporaryDirectory() as tmp:
        for case, arch, overrides, batch, length in CASES:
            cfg = tiny_config(Path(tmp) / "runs", case, arch, *overrides)
            checkpoint = random_checkpoint(cfg)
            out = export_checkpoint(cfg.run.path, Path(tmp) / case)
            theirs = AutoModelForCausalLM.from_pretrained(out).eval()
            ours = load_model(checkpoint, cfg, torch.device("cpu"))
            ids = torch.randint(0, cfg.model.vocab_size, (batch, length))
            with torch.no_grad():
                want, got = ours(ids).logits, theirs(ids).logits
            errors[case] = ((got - want).norm() / want.norm()).item()
    print(json.dumps(errors))


if __name__ == "__main__":
    main()
