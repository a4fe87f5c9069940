"""training.cuda_graphs on the GPU: captured replays equal eager steps, several buckets, no host sync; ZeRO
stage 2's collectives between replays."""
from __future__ import annotations

import pytest
import torch

from mom_train.train import train
from tests.train.conftest import mqar_config, read_losses
from tests.ranks import free_port
from tests.train.test_graphed_step import _global_batches, _run_steps, assert_same_steps, rel_err, zero_on_one_rank

pytestmark = pytest.mark.gpu

GPU_MODEL = ("run.device=cuda", "model.kernel_backend=triton", "model.hidden_size=128", "model.num_heads=2",
             "model.head_dim=64", "training.global_batch_size=8", "training.micro_batch_size=4",
             "training.seq_len=128", "training.grad_clip=0.05")


@pytest.mark.parametrize("arch", ["mom", "gated_deltanet"])
def test_captured_steps_match_eager(tmp_path, arch):
    """Replayed graphs train like eager steps: every parameter's update over 4 steps, the losses and the
    grad norms agree. In fp32 both run the same kernels (only cuBLAS may choose other algorithms under
    capture), so the updates agree closely; in bf16 such rounding differences let AdamW give near-zero
    gradients full-size steps of either sign, which would hide a wrong update."""
    common = (*GPU_MODEL, f"model.arch={arch}", "training.precision=fp32")
    cfg = mqar_config(tmp_path, *common, "training.cuda_graphs=true")
    eager_cfg = mqar_config(tmp_path, *common)
    steps = _global_batches(cfg, 4, split=9)
    initial, _, _, _ = _run_steps(eager_cfg, [])
    params_g, losses_g, norms_g, engine = _run_steps(cfg, steps)
    params_e, losses_e, norms_e, _ = _run_steps(eager_cfg, steps)
    assert engine.graphed.num_graphs >= 2, "expected one graph per segment bucket"
    assert len(set(losses_e)) == len(losses_e), "steps should see different data"
    for a, b in zip(losses_g, losses_e):
        assert abs(a - b) <= 1e-5 * abs(b), (losses_g, losses_e)
    for a, b in zip(norms_g, norms_e):
        assert abs(a - b) <= 1e-4 * abs(b), (norms_g, norms_e)
    for name in params_e:
        update_g, update_e = params_g[name] - initial[name], params_e[name] - initial[name]
        assert rel_err(update_g, update_e) < 1e-3, (name, rel_err(update_g, update_e))


def test_replayed_step_has_no_host_sync(tmp_path):
    cfg = mqar_config(tmp_path, *GPU_MODEL, "training.cuda_graphs=true")
    steps = _global_batches(cfg, 2)
    _, _, _, engine = _run_steps(cfg, steps[:1])
    batch = steps[1][0]
    args = [t.cuda() for t in (batch.input_ids, batch.labels, batch.cu_seqlens)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = engine.forward_backward(*args, 1e-3, 1e-2, last=True)
        engine.step(out.loss_sum)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out.loss_sum)


def test_train_with_cuda_graphs_matches_eager(tmp_path):
    common = (*GPU_MODEL, "training.steps=6", "training.warmup_steps=2")
    graphed_cfg = mqar_config(tmp_path / "graphed", *common, "training.cuda_graphs=true")
    eager_cfg = mqar_config(tmp_path / "eager", *common)
    train(graphed_cfg)
    train(eager_cfg)
    graphed, eager = read_losses(graphed_cfg.run.path), read_losses(eager_cfg.run.path)
    assert sorted(graphed) == sorted(eager) == list(range(1, 7))
    for step in eager:
        assert abs(graphed[step] - eager[step]) <= 2e-3 * abs(eager[step]), (graphed, eager)


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_between_replays_on_one_gpu(tmp_path, monkeypatch, stage):
    """ZeRO stages 1-2 of our engine with captured steps on one GPU (a one-rank NCCL group, ZeroAdamW forced):
    the gradient collective, the sharded fused AdamW and the all-gather run between replays into the captured
    graphs' static parameter and gradient buffers, and train like plain fused AdamW with graphs (fp32)."""
    common = (*GPU_MODEL, "training.precision=fp32", "training.cuda_graphs=true")
    cfg = mqar_config(tmp_path, *common)
    steps = _global_batches(cfg, 4, split=9)
    ref = _run_steps(cfg, steps)
    with zero_on_one_rank(monkeypatch, "nccl", free_port(), stage) as dims:
        got = _run_steps(cfg, steps, ctx=dims)
    engine = got[3]
    assert type(engine.optimizer).__name__ == "ZeroAdamW" and engine.graphed.num_graphs >= 2
    assert_same_steps(got, ref, param_tol=1e-4)
