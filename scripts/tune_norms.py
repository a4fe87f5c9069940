"""Sweep the launch of the two norm backward kernels at MoM-340M sizes on the GPU.

- residual add + RMSNorm backward (every block, twice): M = 16384 rows of D = 1024, bf16 dy / dx, fp32
  residual stream;
- gated RMSNorm backward (the mixer output): M = 65536 rows of D = 256 (4 heads of 256 per token).

Both loop over row blocks in a grid-stride loop and reduce dweight per program. Each variant (values per
block, warps, programs per multiprocessor) is checked against the default launch, then timed (median ms)
and given as effective bandwidth over the bytes it must move. The fastest go into BWD_LAUNCH of
mom_train/kernels/fused_norm/fused.py and mom_train/kernels/gated_rmsnorm/fused.py.

  python scripts/tune_norms.py
"""
from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mom_train.kernels.fused_norm.fused import BWD_LAUNCH as ADD_NORM_BWD  # noqa: E402
from mom_train.kernels.fused_norm.fused import add_rms_norm_bwd, add_rms_norm_fwd  # noqa: E402
from mom_train.kernels.gated_rmsnorm.fused import BWD_LAUNCH as GATED_BWD  # noqa: E402
from mom_train.kernels.gated_rmsnorm.fused import gated_rmsnorm_bwd, gated_rmsnorm_fwd  # noqa: E402

CONFIGS = [dict(elements=e, num_warps=w, programs_per_sm=p)
           for e, w, p in itertools.product((1024, 2048, 4096, 8192), (4, 8, 16), (2, 4, 8, 16))]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def sweep(name: str, run, default: dict, nbytes: int) -> None:
    """run(config) -> tuple of outputs; prints each config's error against the default, ms and GB/s."""
    ref = tuple(t.clone() for t in run(default))
    rows = []
    for cfg in CONFIGS:
        try:
            out = run(cfg)
            err = max(rel(a, b) for a, b in zip(out, ref))
            ms = triton.testing.do_bench(lambda: run(cfg), warmup=10, rep=50)
        except Exception as exc:  # a launch that does not fit (registers, shared memory)
            print(f"  {cfg}: failed ({type(exc).__name__}: {str(exc)[:80]})")
            continue
        rows.append((ms, err, cfg))
    rows.sort(key=lambda r: r[0])
    base_ms = triton.testing.do_bench(lambda: run(default), warmup=10, rep=50)
    print(f"\n{name}: default {default} {base_ms * 1e3:.1f} us ({nbytes / base_ms / 1e6:.0f} GB/s)")
    for ms, err, cfg in rows[:8]:
        print(f"  {ms * 1e3:7.1f} us  {nbytes / ms / 1e6:6.0f} GB/s  err {err:.1e}  {cfg}")


def main() -> None:
    torch.manual_seed(0)
    dev = "cuda"
    # residual add + RMSNorm
    M, D = 16384, 1024
    x = torch.randn(M, D, device=dev, dtype=torch.bfloat16)
    res = torch.randn(M, D, device=dev)
    weight = torch.rand(D, device=dev) + 0.5
    y = torch.empty(M, D, device=dev, dtype=torch.bfloat16)
    new_res = torch.empty(M, D, device=dev)
    rstd = torch.empty(M, device=dev)
    add_rms_norm_fwd(x, res, weight, 1e-6, y, new_res, rstd)
    dy = torch.randn(M, D, device=dev, dtype=torch.bfloat16)
    dres_in = torch.randn(M, D, device=dev)
    dx = torch.empty(M, D, device=dev, dtype=torch.bfloat16)
    dres = torch.empty(M, D, device=dev)

    def add_norm(cfg):
        return add_rms_norm_bwd(new_res, weight, rstd, dy, dres_in, dx, dres, config=cfg)

    # reads new_residual, dnew_residual (fp32), dy (bf16); writes dres (fp32), dx (bf16)
    sweep("add_rms_norm backward M=16384 D=1024", add_norm, ADD_NORM_BWD, M * D * (4 + 4 + 2 + 4 + 2))

    for dtype in (torch.bfloat16, torch.float32):
        M, D = 65536, 256
        x = torch.randn(M, D, device=dev, dtype=dtype)
        gate = torch.randn(M, D, device=dev, dtype=dtype)
        weight = torch.rand(D, device=dev) + 0.5
        y = torch.empty_like(x)
        rstd = torch.empty(M, device=dev)
        gated_rmsnorm_fwd(x, gate, weight, 1e-6, y, rstd)
        dy = torch.randn_like(x)
        dx, dgate = torch.empty_like(x), torch.empty_like(x)

        def gated(cfg):
            return gated_rmsnorm_bwd(x, gate, weight, rstd, dy, dx, dgate, config=cfg)

        # reads x, gate, dy; writes dx, dgate
        sweep(f"gated_rmsnorm backward M=65536 D=256 {dtype}", gated, GATED_BWD[x.element_size()],
              M * D * 5 * x.element_size())


if __name__ == "__main__":
    main()
