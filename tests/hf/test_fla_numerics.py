"""fla's own model classes, fed our fla-format exports, give our logits: on the CPU through the Triton
interpreter (fp32, tiny models; fla's unstable sort patched, see fla_interpreter_check.py), and on the GPU
through fla's compiled kernels at the 340M shapes (bf16)."""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import pytest
import torch

from tests.kernels.interpreter import run_in_interpreter

HERE = Path(__file__).resolve().parent


# about 30 s on 2 cores, most of it importing fla and interpreting its kernels once
@pytest.mark.slow
def test_fla_forward_on_cpu_gives_our_logits():
    pytest.importorskip("fla")
    pytest.importorskip("safetensors")
    errors = run_in_interpreter(str(HERE / "fla_interpreter_check.py"))
    assert len(errors) == 3
    for case, err in errors.items():
        assert err < 1e-5, (case, err)


@contextlib.contextmanager
def stable_argsort():
    """fla 0.6.0's MoM lays tokens into memory streams with `argsort()`; an unstable sort (torch's CUDA sort
    below about 32 elements, some CPU sizes) reorders a stream's tokens and gives wrong logits. Stable here."""
    argsort = torch.Tensor.argsort
    torch.Tensor.argsort = lambda self, *a, **k: argsort(self, *a, **{**k, "stable": True})
    try:
        yield
    finally:
        torch.Tensor.argsort = argsort


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["mom_340m.yaml", "gdn_340m.yaml"])
def test_fla_kernels_give_our_logits_at_340m_gpu(tmp_path, monkeypatch, name: str):
    """MoM-340M- and GDN-340M-shaped random weights exported to fla's format, run by fla's Triton kernels (eval
    mode; fla's sort patched stable, see `stable_argsort`) against our fp32 model on plain torch ops:
    fla in fp32 within fp32 rounding, and fla in bf16 about as close as our own bf16 autocast forward (fla
    keeps every weight and the residual stream in bf16, ours keeps fp32 weights and an fp32 residual).

    fla's kernels leave the precision of their fp32 dots to Triton's default, TF32 on Ampere and later, and
    TF32-sized rounding moves these 24-layer random-init logits by about 1e-2 (5e-4 relative noise on the
    weights moved MoM's by 1.4e-2 and Gated DeltaNet's by 6.9e-3 on a CPU, routing near-ties adding to MoM's;
    1e-6 moved MoM's by 1.5e-5). TRITON_F32_DEFAULT=ieee makes fla's fp32 run a real fp32 one; ours name the
    precision of every dot, so only fla's kernels change."""
    pytest.importorskip("fla")
    monkeypatch.setenv("TRITON_F32_DEFAULT", "ieee")
    from mom_train.checkpoint import load_model, save_weights_only
    from mom_train.config import load_config
    from mom_train.hf import export_checkpoint
    from mom_train.model import build_model
    from mom_train.precision import autocast_context
    from tests.hf.helpers import CONFIGS

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import fla  # noqa: F401 (registers fla's classes with transformers)
        from transformers import AutoModelForCausalLM
    cuda = torch.device("cuda")
    cfg = load_config(CONFIGS / name, [f"run.dir={tmp_path}", "run.name=gpu", "training.cuda_graphs=false"],
                      world_size=1)
    torch.manual_seed(0)
    checkpoint = save_weights_only(cfg.run.path, build_model(cfg.model).state_dict(), cfg, "random init")
    out = export_checkpoint(cfg.run.path, tmp_path / "hf", tokenizer=False)
    reference_cfg = load_config(checkpoint / "config.yaml", ["model.kernel_backend=torch"], world_size=1)
    # 4 x 512 tokens: fla's chunked kernels (eval mode takes its recurrent ones up to 64 tokens)
    ids = torch.randint(0, cfg.model.vocab_size, (4, 512), device=cuda)
    with torch.no_grad():
        reference = load_model(checkpoint, reference_cfg, cuda)(ids).logits.float()
        ours = load_model(checkpoint, cfg, cuda)
        with autocast_context("bf16", cuda):
            ours_bf16 = ours(ids).logits.float()
        del ours
        with stable_argsort():
            theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).to(cuda).eval()
            fla_fp32 = theirs(ids).logits.float()
            fla_bf16 = theirs.to(torch.bfloat16)(ids).logits.float()
    errors = {"fla fp32": rel_err(fla_fp32, reference), "ours bf16": rel_err(ours_bf16, reference),
              "fla bf16": rel_err(fla_bf16, reference)}
    print(f"\n{name}: relative error of the logits against our fp32 model: {errors}")
    assert errors["fla fp32"] < 1e-3, errors
    # our bf16 autocast forward of the same weights moved the logits by 3.5e-2 (MoM), 3.0e-2 (GDN) on a CPU
    assert errors["ours bf16"] < 0.05, errors
    assert errors["fla bf16"] < max(4 * errors["ours bf16"], 0.03), errors
