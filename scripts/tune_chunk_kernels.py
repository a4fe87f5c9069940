"""Sweep the launch settings (BV, warps, stages) of the chunked gated-delta-rule kernels on the GPU.

The shape is one MoM-340M layer's buffer: 8 documents of 2048 tokens, each split over 4 memories (top-2,
so 4096 rows per document) plus the shared memory: 40 segments, 49,152 rows, 4 heads, K = V = 256, bf16.
Each setting is first checked against the default launch (relative error of every output), then timed
(median milliseconds). The fastest go into seq_config (state passes h_fwd, dh_bwd) and the launchers of
mom_train/kernels/gated_delta_rule/chunk_fwd.py / chunk_bwd.py.

  python scripts/tune_chunk_kernels.py [h_fwd dh_bwd o_fwd dqkw wy_bwd prepare h_fwd_order dh_bwd_order]

h_fwd_order / dh_bwd_order time the state passes' own launch with the sequences in grid order and reversed
(REVERSE_SEQS: the shared-memory streams, last in the buffer and the longest, start first).

prepare is last and not in the default list: on an H100 (Triton 3.6) its first non-default setting
(BV=32, 4 warps, 1 stage) stopped with an illegal memory access, which ends the process's CUDA context.
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

from chunk_passes import run_chunk_passes  # noqa: E402
from mom_train.kernels.gated_delta_rule.chunk_bwd import dh_bwd, dqkw_bwd, wy_bwd  # noqa: E402
from mom_train.kernels.gated_delta_rule.chunk_fwd import BT, h_fwd, o_fwd, prepare_fwd, seq_config  # noqa: E402

# BV per kernel: the state passes keep a [K, BV] state tile; the chunk-parallel kernels loop over V in BV tiles
BLOCKS = {"h_fwd": (16, 32, 64), "dh_bwd": (16, 32, 64), "prepare": (32, 64), "o_fwd": (32, 64, 128),
          "dqkw": (32, 64), "wy_bwd": (32, 64)}


def settings(name: str) -> list[dict]:
    if name.endswith("_order"):
        # the state pass's own launch, with the sequences in grid order or reversed
        base = seq_config(256, 256, torch.bfloat16, backward=name.startswith("dh"), device=torch.device("cuda"))
        return [dict(base, REVERSE_SEQS=reverse) for reverse in (False, True)]
    stages = (1, 2) if name in ("h_fwd", "dh_bwd") else (1, 2, 3)
    return [dict(BV=bv, num_warps=nw, num_stages=ns)
            for bv, nw, ns in itertools.product(BLOCKS[name], (4, 8), stages)]


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
    q = F.normalize(torch.randn(TT, H, K, device="cuda"), dim=-1).to(torch.bfloat16)
    k = F.normalize(torch.randn(TT, H, K, device="cuda"), dim=-1).to(torch.bfloat16)
    v = torch.randn(TT, H, V, device="cuda", dtype=torch.bfloat16)
    g = F.logsigmoid(torch.randn(TT, H, device="cuda") + 3)
    beta = torch.rand(TT, H, device="cuda").to(torch.bfloat16)
    do = torch.randn(TT, H, V, device="cuda", dtype=torch.bfloat16)
    scale = K ** -0.5
    passes = run_chunk_passes(q, k, v, g, beta, do, cu, num_slots, scale)
    coff, table, gamma, Ai, w, u, h, vnew, dvl, dh, dv2, dq, dka, dw, dgp = (passes[n] for n in "coff, table, gamma, Ai, w, u, h, vnew, dvl, dh, dv2, dq, dka, dw, dgp".split(", "))

    # chunk slots past the last chunk are never written: compare the used ones
    used = table[:, 1] >= 0
    passes = {
        "h_fwd": lambda cfg: (lambda h, vn, _: (h[used], vn))(
            *h_fwd(k, w, u, gamma, cu, coff, num_slots, None, False, config=cfg)),
        "dh_bwd": lambda cfg: (lambda dh, dv, _: (dh[used], dv))(
            *dh_bwd(q, k, w, do, dvl, gamma, cu, coff, num_slots, scale, None, False, config=cfg)),
        "prepare": lambda cfg: prepare_fwd(k, v, g, beta, cu, table, config=cfg),
        "o_fwd": lambda cfg: [o_fwd(q, k, vnew, h, gamma, cu, table, scale, v.dtype, config=cfg)],
        "dqkw": lambda cfg: dqkw_bwd(q, k, vnew, h, dh, do, dv2, gamma, cu, table, scale, config=cfg),
        "wy_bwd": lambda cfg: wy_bwd(k, v, beta, gamma, Ai, dw, dv2, dka, dgp, cu, table, config=cfg),
    }
    passes["h_fwd_order"], passes["dh_bwd_order"] = passes["h_fwd"], passes["dh_bwd"]
    names = sys.argv[1:] or [n for n in passes if n not in ("prepare", "h_fwd_order", "dh_bwd_order")]
    print(f"{len(lengths)} segments, {TT} rows, H={H} K={K} V={V}", flush=True)
    for name in names:
        run = passes[name]
        ref = [t.clone() for t in run(None)]
        default_ms = triton.testing.do_bench(lambda: run(None), return_mode="median")
        results = []
        for cfg in settings(name):
            try:
                out = run(cfg)
                err = max(rel(a, b) for a, b in zip(out, ref))
                ms = triton.testing.do_bench(lambda: run(cfg), return_mode="median")
            except Exception as exc:  # a setting that does not fit (shared memory, registers) is reported
                print(f"{name} {cfg}: {exc!r}"[:160], flush=True)
                if "illegal memory access" in str(exc):
                    # the CUDA context is lost: later launches in this process would all fail
                    print(f"== {name}: stopped at {cfg} (illegal memory access); run the remaining passes "
                          f"in a new process", flush=True)
                    return
                continue
            results.append((ms, cfg, err))
            print(f"{name} {cfg} {ms:.3f} ms err {err:.1e}", flush=True)
        good = [r for r in results if r[2] < 1e-2]
        ms, cfg, err = min(good, key=lambda r: r[0]) if good else (float("nan"), None, None)
        print(f"== {name}: default {default_ms:.3f} ms, best {cfg} {ms:.3f} ms (err {err})", flush=True)


if __name__ == "__main__":
    main()
