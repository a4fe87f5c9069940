"""training.cuda_graphs: segment padding, the flat gradient buffer, and the graphed engine against the eager one.

On CPU the graphed engine runs its static buffers eagerly (capture=False): padding, flat gradients, the
explicit data-parallel all-reduce and clipping are the same code as on the GPU. The capture itself is checked
against eager execution by the gpu-marked tests.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
import torch.multiprocessing as mp

from mom_train.config import ConfigError
from mom_train.data import build_loader
from mom_train.cuda_graph import FlatGrads, pad_cu_seqlens, segment_bucket
from mom_train.engine import Engine
from mom_train.model import build_model
from mom_train.parallel.dims import ParallelDims, resolve_device
from mom_train.parallel.parallelize import parallelize
from mom_train.train import count_valid_targets, to_device
from tests.ranks import free_port
from tests.train.conftest import mqar_config


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-12))


def test_segment_bucket():
    assert [segment_bucket(n) for n in (0, 1, 15, 16, 17, 32, 33, 1000)] == [16, 16, 16, 16, 32, 32, 64, 1024]
    assert segment_bucket(3, minimum=1) == 4 and segment_bucket(1, minimum=1) == 1


def test_pad_cu_seqlens():
    cu = torch.tensor([0, 3, 10], dtype=torch.int32)
    padded = pad_cu_seqlens(cu, 5)
    assert padded.dtype == torch.int32 and padded.tolist() == [0, 3, 10, 10, 10, 10]
    assert pad_cu_seqlens(cu, 2) is cu
    with pytest.raises(ValueError, match="cannot pad 2 segments into 1"):
        pad_cu_seqlens(cu, 1)


def _split_documents(batch, cuts: int):
    """The batch with `cuts` extra segment starts (more documents than the smallest bucket)."""
    T = batch.input_ids.shape[1]
    starts = set(batch.cu_seqlens.tolist()) | {int(x) for x in torch.linspace(1, T - 1, cuts)}
    batch.cu_seqlens = torch.tensor(sorted(starts), dtype=torch.int32)
    return batch


@pytest.mark.parametrize("arch", ["mom", "gated_deltanet"])
def test_padded_segments_change_nothing(tmp_path, arch):
    """Trailing empty documents leave the loss, the aux loss and every gradient unchanged."""
    cfg = mqar_config(tmp_path, f"model.arch={arch}")
    model = build_model(cfg.model)
    batch = _split_documents(next(build_loader(cfg)), 5)
    n = batch.cu_seqlens.numel() - 1
    results = []
    for cu in (batch.cu_seqlens, pad_cu_seqlens(batch.cu_seqlens, n + 7)):
        model.zero_grad(set_to_none=True)
        out = model(batch.input_ids, cu_seqlens=cu, labels=batch.labels)
        (out.loss_sum + out.aux_loss).backward()
        results.append((out.loss_sum.detach(), out.aux_loss.detach(),
                        {k: p.grad.clone() for k, p in model.named_parameters()}))
    (loss_a, aux_a, grads_a), (loss_b, aux_b, grads_b) = results
    assert rel_err(loss_b, loss_a) < 1e-6 and rel_err(aux_b, aux_a) < 1e-6
    for name in grads_a:
        assert rel_err(grads_b[name], grads_a[name]) < 1e-5, name


def test_flat_grads_views_and_clip():
    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
    flat = FlatGrads(params)
    assert flat.buffer.numel() == 17 and flat.attached()
    (params[0].sum() * 3 + (params[1] ** 2).sum()).backward()
    assert torch.equal(flat.buffer[:12], torch.full((12,), 3.0))
    assert torch.allclose(flat.buffer[12:], 2 * params[1].detach())
    expected = torch.nn.utils.get_total_norm([p.grad for p in params])
    norm = flat.clip_(1.0)
    assert torch.allclose(norm, expected)
    assert torch.allclose(torch.linalg.vector_norm(flat.buffer), torch.tensor(1.0), atol=1e-5)
    flat.zero_()
    assert not params[0].grad.any()
    params[1].grad = None
    assert not flat.attached()
    with pytest.raises(ValueError, match="one dtype"):
        FlatGrads([torch.nn.Parameter(torch.randn(2)), torch.nn.Parameter(torch.randn(2, dtype=torch.float64))])


def _global_batches(cfg, steps: int, split: int = 0) -> list[list]:
    """`steps` lists of grad_accum micro-batches from one loader; with split, one micro-batch per step gets
    more documents than the smallest segment bucket (a second graph key)."""
    loader = build_loader(cfg)
    grad_accum = cfg.grad_accum_steps(1)
    out = []
    for step in range(steps):
        batches = [next(loader) for _ in range(grad_accum)]
        if split:
            batches[step % grad_accum] = _split_documents(batches[step % grad_accum], split * (step + 1))
        out.append(batches)
    loader.close()
    return out


def _half(batch, rank: int):
    """Rank `rank`'s half of a packed micro-batch, cut at a document boundary."""
    T = batch.input_ids.shape[1]
    cu = batch.cu_seqlens
    assert (cu == T // 2).any(), "the test needs a document boundary at the middle"
    sl = slice(0, T // 2) if rank == 0 else slice(T // 2, T)
    keep = (cu <= T // 2) if rank == 0 else (cu >= T // 2)
    return type(batch)(batch.input_ids[:, sl].clone(), batch.labels[:, sl].clone(),
                       (cu[keep] - (0 if rank == 0 else T // 2)).to(torch.int32))


def _run_steps(cfg, steps: list[list], ctx: ParallelDims | None = None):
    """Parameters, losses and grad norms after trainer steps over `steps` (lists of micro-batches). With
    training.cuda_graphs the steps are captured on CUDA and run through the same static buffers on CPU."""
    ctx = ctx or ParallelDims(device=resolve_device(cfg))
    torch.manual_seed(0 if ctx.rank == 0 else 1234)
    model = build_model(cfg.model)
    engine = Engine(parallelize(model, ctx, cfg), cfg, ctx, capture=ctx.device.type == "cuda")
    losses, norms = [], []
    for step, batches in enumerate(steps):
        total = ctx.sum_int(sum(count_valid_targets(b) for b in batches))
        engine.set_lr(step)
        step_loss = torch.zeros((), device=ctx.device)
        for i, b in enumerate(batches):
            out = engine.forward_backward(*to_device((b.input_ids, b.labels, b.cu_seqlens), ctx.device),
                                          ctx.dp_size / total,
                                          cfg.model.aux_loss_coef / len(batches), last=i == len(batches) - 1)
            step_loss += out.loss_sum
        norm, _ = engine.step(step_loss)
        losses.append(float(step_loss))
        norms.append(float(norm))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, losses, norms, engine


def _run_engine_steps(cfg, steps: list[list], dims: ParallelDims):
    """(full parameters on the first rank, global losses, grad norms) after engine steps over `steps` (lists of
    micro-batches, the same on every rank: a tensor-parallel group). With training.cuda_graphs the flat-buffer
    path runs eagerly (capture=False)."""
    torch.manual_seed(0)
    engine = Engine(parallelize(build_model(cfg.model), dims, cfg), cfg, dims, capture=False)
    losses, norms = [], []
    for step, batches in enumerate(steps):
        total = sum(count_valid_targets(b) for b in batches)
        engine.set_lr(step)
        step_loss = torch.zeros(())
        for i, b in enumerate(batches):
            out = engine.forward_backward(b.input_ids, b.labels, b.cu_seqlens, 1.0 / total,
                                          cfg.model.aux_loss_coef / len(batches), last=i == len(batches) - 1)
            step_loss += out.loss_sum
        norm, _ = engine.step(step_loss)
        # each tp rank scored its token shard
        losses.append(float(dims.all_reduce_(step_loss)))
        norms.append(float(norm))
    return engine.state_dict()["model"], losses, norms


def assert_same_steps(got: tuple, ref: tuple, param_tol: float = 1e-5) -> None:
    """got / ref: (parameters, losses, grad norms) of `_run_steps`; losses to 1e-5, norms to 1e-4, every
    parameter to param_tol (relative)."""
    params, losses, norms = got[:3]
    params_ref, losses_ref, norms_ref = ref[:3]
    for a, b in zip(losses, losses_ref, strict=True):
        assert abs(a - b) <= 1e-5 * abs(b), (losses, losses_ref)
    for a, b in zip(norms, norms_ref, strict=True):
        assert abs(a - b) <= 1e-4 * abs(b), (norms, norms_ref)
    for name in params_ref:
        assert rel_err(params[name], params_ref[name]) < param_tol, (name, rel_err(params[name], params_ref[name]))


def test_graphed_engine_matches_eager(tmp_path):
    common = ("training.global_batch_size=8", "training.micro_batch_size=4", "training.grad_clip=0.05")
    cfg = mqar_config(tmp_path, *common, "training.cuda_graphs=true")
    eager_cfg = mqar_config(tmp_path, *common)
    steps = _global_batches(cfg, 3, split=9)
    graphed = _run_steps(cfg, steps)
    eager = _run_steps(eager_cfg, steps)
    engine = graphed[3]
    assert engine.graphed is not None and len(engine.graphed.entries) >= 2, "expected several segment buckets"
    assert engine.gradients.flat.attached() and not engine.gradients.flat.buffer.any()
    # the clip is active (the norm is far above 0.05), so the update depends on it
    assert min(eager[2]) > 0.05
    assert_same_steps(graphed, eager)


def test_cuda_graphs_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="model.mom_impl=fast"):
        mqar_config(tmp_path, "training.cuda_graphs=true", "model.mom_impl=reference")
    cfg = mqar_config(tmp_path, "training.cuda_graphs=true")
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        Engine(parallelize(build_model(cfg.model), ParallelDims(), cfg), cfg, ParallelDims())


def test_replaced_grad_is_an_error(tmp_path):
    cfg = mqar_config(tmp_path, "training.cuda_graphs=true")
    model = build_model(cfg.model)
    engine = Engine(parallelize(model, ParallelDims(), cfg), cfg, ParallelDims(), capture=False)
    engine.optimizer.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match="flat buffer"):
        engine.step(torch.zeros(()))


# the router's load-balancing loss is a statistic of each micro-batch, so halving micro-batches changes it
DP_COMMON = ("training.micro_batch_size=4", "training.global_batch_size=8", "model.aux_loss_coef=0")


def _dp_worker(rank: int, world: int, port: int, run_dir: str, out: str, zero_stage: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
    ctx = ParallelDims(rank=rank, world_size=world, dp_rank=rank, dp_size=world, world_group=dist.group.WORLD,
                       cpu_group=dist.group.WORLD, grad_group=dist.group.WORLD)
    cfg = mqar_config(run_dir, *DP_COMMON, "training.cuda_graphs=true", f"parallel.zero_stage={zero_stage}",
                      world_size=world)
    steps = [[_half(b, rank) for b in batches] for batches in _global_batches(cfg, 2)]
    # rank 1 starts from other weights (seed): the engine must broadcast rank 0's
    params, _, norms, _ = _run_steps(cfg, steps, ctx=ctx)
    if rank == 0:
        torch.save({"params": params, "norms": norms}, out)
    dist.destroy_process_group()


@pytest.mark.parametrize("zero_stage", [0, 1, 2])
def test_graphed_two_ranks_gloo_equal_one_rank(tmp_path, zero_stage):
    """Flat-buffer all-reduce: 2 ranks x 2 micro-batches of 2 sequences = 1 rank x 2 micro-batches of 4; with
    ZeRO stage 1 (all-reduce) or 2 (reduce-scatter) each rank updates its shard of the flat-buffer gradients'
    parameters."""
    out = str(tmp_path / "two.pt")
    mp.spawn(_dp_worker, args=(2, free_port(), str(tmp_path), out, zero_stage), nprocs=2, join=True)
    two = torch.load(out)
    cfg = mqar_config(tmp_path, *DP_COMMON)
    params, _, norms, _ = _run_steps(cfg, _global_batches(cfg, 2))
    for a, b in zip(two["norms"], norms):
        assert abs(a - b) <= 1e-4 * abs(b)
    for name in params:
        assert rel_err(two["params"][name], params[name]) < 1e-5, name


@contextlib.contextmanager
def zero_on_one_rank(monkeypatch, backend: str, port: int, stage: int = 2) -> Iterator[ParallelDims]:
    """A one-rank process group whose engine shards over it anyway: ZeroAdamW (normally used only with several
    dp x cp ranks) with its reduce-scatter / all-reduce and all-gather, so that one device runs the whole
    ZeRO step. Yields the dims to build the engine with; the group is destroyed on leaving, whatever happened
    (a live NCCL group would hang the test process at exit)."""
    import torch.distributed as dist

    import mom_train.engine as engine_mod
    from mom_train.parallel.zero import ZeroAdamW

    def build_zero(groups, t, dims, zero_stage, gradients):
        decayed = {id(p) for p in groups[0]["params"]}
        return ZeroAdamW(gradients.flat, decayed, dims, stage, lr=t.lr, betas=tuple(t.betas), eps=t.eps,
                         weight_decay=groups[0]["weight_decay"])

    dist.init_process_group(backend, rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{port}")
    try:
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        dims = ParallelDims(device=device, world_group=dist.group.WORLD, cpu_group=dist.new_group(backend="gloo"),
                            grad_group=dist.group.WORLD)
        monkeypatch.setattr(engine_mod, "build_optimizer", build_zero)
        yield dims
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_engine_on_one_rank_equals_plain_adamw(tmp_path, monkeypatch, stage):
    """ZeroAdamW through the flat-buffer engine (eager here; captured in test_graphed_step_gpu.py) on a one-rank
    group trains like fused AdamW: the same losses, norms and weights over 3 clipped steps."""
    common = ("training.global_batch_size=8", "training.micro_batch_size=4", "training.grad_clip=0.05",
              "training.cuda_graphs=true")
    cfg = mqar_config(tmp_path, *common)
    steps = _global_batches(cfg, 3, split=9)
    ref = _run_steps(cfg, steps)
    with zero_on_one_rank(monkeypatch, "gloo", free_port(), stage) as dims:
        got = _run_steps(cfg, steps, ctx=dims)
    assert type(got[3].optimizer).__name__ == "ZeroAdamW" and got[3].optimizer.stage == stage
    assert min(ref[2]) > 0.05
    assert_same_steps(got, ref)
