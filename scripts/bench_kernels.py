"""Time our Triton chunk_gated_delta_rule against flash-linear-attention's, side by side, on one GPU.

Usage (GPU machine, flash-linear-attention 0.6.0 importable; for timing only, lift its guard that refuses the
gated backward on Hopper with Triton 3.4-3.7.0 in fla/ops/common/chunk_o.py, as scripts/bench_model.py does):
    python3 scripts/bench_kernels.py [SHAPE_NAME ...] [--breakdown]
Median of CUDA-event timings (triton.testing.do_bench) after warmup, bf16 inputs (normalised keys, logsigmoid
decays). Prints a table with our/fla ratios (with --breakdown also the time of each of our kernels) and writes JSON to
$OUT/bench_kernels.json.
"""
from __future__ import annotations

import json
import math
import os
import sys

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from mom_train.kernels.gated_delta_rule import chunk as ours_mod
from mom_train.kernels.gated_delta_rule.chunk_bwd import dh_bwd, dqkw_bwd, dv_local_bwd, wy_bwd
from mom_train.kernels.gated_delta_rule.chunk_fwd import chunk_tables, h_fwd, o_fwd, prepare_fwd, wu_fwd
from chunk_passes import run_chunk_passes

DEV = "cuda"


def long_varlen_bounds(total: int, seed: int) -> list[int]:
    """Packed documents of random lengths (64..8191) summing to total."""
    gen = torch.Generator().manual_seed(seed)
    bounds = [0]
    while bounds[-1] < total:
        n = int(torch.randint(64, 8192, (1,), generator=gen))
        bounds.append(min(total, bounds[-1] + n))
    return bounds


SHAPES = [
    dict(name="B8_T2048_H4_K256", B=8, T=2048, H=4, K=256, V=256, cu=None),
    dict(name="B8_T2048_H16_K128", B=8, T=2048, H=16, K=128, V=128, cu=None),
    dict(name="varlen6_T16384_H4_K256", B=1, T=16384, H=4, K=256, V=256, cu=[0, 1000, 3000, 3100, 8192, 12000, 16384]),
    dict(name="varlen_T65536_H4_K256", B=1, T=65536, H=4, K=256, V=256, cu=long_varlen_bounds(65536, 0)),
]


def make_inputs(s: dict) -> dict:
    torch.manual_seed(0)
    B, T, H, K, V = s["B"], s["T"], s["H"], s["K"], s["V"]
    x = dict(
        q=torch.randn(B, T, H, K, device=DEV, dtype=torch.bfloat16),
        k=F.normalize(torch.randn(B, T, H, K, device=DEV), dim=-1).to(torch.bfloat16),
        v=torch.randn(B, T, H, V, device=DEV, dtype=torch.bfloat16),
        g=F.logsigmoid(torch.randn(B, T, H, device=DEV)),
        beta=torch.rand(B, T, H, device=DEV).sigmoid().to(torch.bfloat16),
    )
    for t in x.values():
        t.requires_grad_()
    x["cu"] = None if s["cu"] is None else torch.tensor(s["cu"], device=DEV, dtype=torch.int32)
    x["do"] = torch.randn(B, T, H, V, device=DEV, dtype=torch.bfloat16)
    return x


def time_impl(fn, x: dict) -> tuple[float, float]:
    leaves = [x[n] for n in ("q", "k", "v", "g", "beta")]

    def fwd():
        return fn(*leaves, cu_seqlens=x["cu"])[0]

    def fwd_bwd():
        fwd().backward(x["do"])

    with torch.no_grad():
        f_ms = do_bench(fwd, warmup=50, rep=200, return_mode="median")
    fb_ms = do_bench(fwd_bwd, warmup=50, rep=300, grad_to_none=leaves, return_mode="median")
    return f_ms, fb_ms


def grads_of(fn, x: dict) -> list[torch.Tensor]:
    leaves = [x[n] for n in ("q", "k", "v", "g", "beta")]
    for t in leaves:
        t.grad = None
    o = fn(*leaves, cu_seqlens=x["cu"])[0]
    o.backward(x["do"])
    out = [o.detach().float()] + [t.grad.float() for t in leaves]
    for t in leaves:
        t.grad = None
    return out


def breakdown(x: dict) -> dict:
    """Median time of each of our kernels (wrappers) on these inputs."""
    B, T, H, K = x["q"].shape
    V = x["v"].shape[-1]
    TT = B * T
    q, k, v = (x[n].detach().reshape(TT, H, -1) for n in ("q", "k", "v"))
    g, beta = x["g"].detach().reshape(TT, H), x["beta"].detach().reshape(TT, H)
    do = x["do"].reshape(TT, H, V)
    if x["cu"] is None:
        cu = torch.arange(0, (B + 1) * T, T, device=DEV, dtype=torch.int32)
        slots = B * triton.cdiv(T, 64)
    else:
        cu = x["cu"]
        slots = triton.cdiv(T, 64) + cu.shape[0] - 1
    scale = K ** -0.5
    passes = run_chunk_passes(q, k, v, g, beta, do, cu, slots, scale)
    coff, table, gamma, Ai, w, u, h, vnew, dvl, dh, dv2, dq, dka, dw, dgp = (passes[n] for n in "coff, table, gamma, Ai, w, u, h, vnew, dvl, dh, dv2, dq, dka, dw, dgp".split(", "))
    stages = {
        "tables": lambda: chunk_tables(cu, slots),
        "prepare": lambda: prepare_fwd(k, v, g, beta, cu, table),
        "wu": lambda: wu_fwd(k, v, beta, gamma, Ai, cu, table),
        "h_fwd": lambda: h_fwd(k, w, u, gamma, cu, coff, slots, None, False),
        "o_fwd": lambda: o_fwd(q, k, vnew, h, gamma, cu, table, scale, v.dtype),
        "dv_local": lambda: dv_local_bwd(q, k, do, gamma, cu, table, scale),
        "dh_bwd": lambda: dh_bwd(q, k, w, do, dvl, gamma, cu, coff, slots, scale, None, False),
        "dqkw": lambda: dqkw_bwd(q, k, vnew, h, dh, do, dv2, gamma, cu, table, scale),
        "wy_bwd": lambda: wy_bwd(k, v, beta, gamma, Ai, dw, dv2, dka, dgp, cu, table),
    }
    return {name: do_bench(fn, warmup=25, rep=100, return_mode="median") for name, fn in stages.items()}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def main() -> None:
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_gdr
    ours = ours_mod.chunk_gated_delta_rule
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "shapes": []}
    names = [a for a in sys.argv[1:] if not a.startswith("--")] or [s["name"] for s in SHAPES]
    for s in SHAPES:
        if s["name"] not in names:
            continue
        x = make_inputs(s)
        of, ofb = time_impl(ours, x)
        try:
            agree = [rel(a, b) for a, b in zip(grads_of(ours, x), grads_of(fla_gdr, x))]
            ff, ffb = time_impl(fla_gdr, x)
        except Exception as e:  # keep our numbers if the peer fails on a shape
            print(f"fla failed on {s['name']}: {e!r}"[:300], flush=True)
            agree, ff, ffb = [], math.nan, math.nan
        r = dict(name=s["name"], ours_fwd_ms=of, ours_fwdbwd_ms=ofb, fla_fwd_ms=ff, fla_fwdbwd_ms=ffb,
                 ratio_fwd=of / ff, ratio_fwdbwd=ofb / ffb,
                 rel_diff_vs_fla=dict(zip(["o", "dq", "dk", "dv", "dg", "dbeta"], agree)))
        res["shapes"].append(r)
        print(json.dumps(r), flush=True)
        json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), "bench_kernels.json"), "w"), indent=1)
    if "--breakdown" in sys.argv:
        res["breakdown_ms"] = {s["name"]: breakdown(make_inputs(s)) for s in SHAPES[:2]}
    json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), "bench_kernels.json"), "w"), indent=1)
    print(f"\n{res['device']}, torch {res['torch']}, triton {res['triton']}; bf16, median ms (do_bench)")
    print(f"| shape | ours fwd | fla fwd | ratio | ours fwd+bwd | fla fwd+bwd | ratio |")
    print("|---|---|---|---|---|---|---|")
    for r in res["shapes"]:
        print(f"| {r['name']} | {r['ours_fwd_ms']:.3f} | {r['fla_fwd_ms']:.3f} | {r['ratio_fwd']:.2f} | "
              f"{r['ours_fwdbwd_ms']:.3f} | {r['fla_fwdbwd_ms']:.3f} | {r['ratio_fwdbwd']:.2f} |")
    for name, times in res.get("breakdown_ms", {}).items():
        print(name, "kernels (ms):", " ".join(f"{k}={v:.3f}" for k, v in times.items()))


if __name__ == "__main__":
    main()
