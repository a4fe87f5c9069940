"""Sweep the launch settings (BV, warps, stages) of the sequential state passes h_fwd and dh_bwd on the GPU.

The shape is one MoM-340M layer's buffer: 8 documents of 2048 tokens, each split over 4 memories (top-2,
so 4096 rows per document) plus the shared memory: 40 segments, 49,152 rows, 4 heads, K = V = 256, bf16.
Each setting is first checked against the default launch (relative error of every output), then timed
(median milliseconds). The fastest goes into seq_config in mom_train/kernels/gated_delta_rule/chunk_fwd.py.

  python scripts/tune_state_pass.py
"""
from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mom_train.kernels.gated_delta_rule.chunk_bwd import dh_bwd, dv_local_bwd  # noqa: E402
from mom_train.kernels.gated_delta_rule.chunk_fwd import BT, chunk_tables, h_fwd, prepare_fwd  # noqa: E402

SETTINGS = [dict(BV=bv, num_warps=nw, num_stages=ns)
            for bv, nw, ns in itertools.product((16, 32, 64), (4, 8), (1, 2))]


def mom_segments(gen: torch.Generator) -> list[int]:
    """Segment lengths of one MoM layer's buffer: per document, 4096 rows split at random over 4 memories,
    then the document's 2048 shared-memory rows."""
    lengths = []
    for _ in range(8):
        cuts = sorted(int(c) for c in torch.randint(0, 4097, (3,), generator=gen))
        lengths += [b - a for a, b in zip([0] + cuts, cuts + [4096])] + [2048]
    return lengths


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    lengths = mom_segments(gen)
    TT, H, K, V = sum(lengths), 4, 256, 256
    torch.manual_seed(0)
    cu = torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32)
    num_slots = triton.cdiv(TT, BT) + len(lengths)
    coff, table = chunk_tables(cu, num_slots)
    q = F.normalize(torch.randn(TT, H, K, device="cuda"), dim=-1).to(torch.bfloat16)
    k = F.normalize(torch.randn(TT, H, K, device="cuda"), dim=-1).to(torch.bfloat16)
    v = torch.randn(TT, H, V, device="cuda", dtype=torch.bfloat16)
    g = F.logsigmoid(torch.randn(TT, H, device="cuda") + 3)
    beta = torch.rand(TT, H, device="cuda").to(torch.bfloat16)
    do = torch.randn(TT, H, V, device="cuda", dtype=torch.bfloat16)
    scale = K ** -0.5
    gamma, _, w, u = prepare_fwd(k, v, g, beta, cu, table)
    dvl = dv_local_bwd(q, k, do, gamma, cu, table, scale)

    passes = {
        "h_fwd": lambda cfg: h_fwd(k, w, u, gamma, cu, coff, num_slots, None, False, config=cfg)[:2],
        "dh_bwd": lambda cfg: dh_bwd(q, k, w, do, dvl, gamma, cu, coff, num_slots, scale, None, False,
                                     config=cfg)[:2],
    }
    print(f"{len(lengths)} segments, {TT} rows, H={H} K={K} V={V}", flush=True)
    for name, run in passes.items():
        ref = [t.clone() for t in run(None)]
        default_ms = triton.testing.do_bench(lambda: run(None), return_mode="median")
        results = []
        for cfg in SETTINGS:
            try:
                out = run(cfg)
                err = max(rel(a, b) for a, b in zip(out, ref))
                ms = triton.testing.do_bench(lambda: run(cfg), return_mode="median")
            except Exception as exc:  # a setting that does not fit (shared memory, registers) is reported
                print(f"{name} {cfg}: {exc!r}"[:160], flush=True)
                continue
            results.append((ms, cfg, err))
            print(f"{name} {cfg} {ms:.3f} ms err {err:.1e}", flush=True)
        good = [r for r in results if r[2] < 1e-2]
        ms, cfg, err = min(good, key=lambda r: r[0]) if good else (float("nan"), None, None)
        print(f"== {name}: default {default_ms:.3f} ms, best {cfg} {ms:.3f} ms (err {err})", flush=True)


if __name__ == "__main__":
    main()
