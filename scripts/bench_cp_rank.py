"""Context parallelism's delta-rule cost on one rank, timed on one device: what a middle rank of a document split
over cp ranks runs (`handing_on_passes`: the pass from zero states and the pass from the identity, then the
incoming state's share of the output) against the plain chunked pass over the same rows, forward and
forward + backward. The collectives are left out: this is the kernel work that the rank-level design adds.

    python scripts/bench_cp_rank.py                               # GPU: one rank's shard of 16384 tokens, 4 heads of 256
    python scripts/bench_cp_rank.py --tokens 8192 --heads 16 --head-dim 128
    python scripts/bench_cp_rank.py --device cpu --tokens 130 --heads 2 --head-dim 16 --backend torch --reps 1

Before timing, the middle rank's output is checked against one pass from the incoming state (the quantity it
stands for). Prints one line per measurement and, with $OUT set, writes $OUT/bench_cp_rank.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from mom_train.kernels.cp.state_passing import handing_on_passes, incoming_share  # noqa: E402
from mom_train.kernels.gated_delta_rule import gated_delta_rule  # noqa: E402


def make_inputs(tokens: int, heads: int, head_dim: int, device: torch.device, dtype: torch.dtype) -> dict:
    """One rank's rows of one document: q, k (unit keys) [1, L, H, K], v [1, L, H, K], g (log decays) and beta
    [1, L, H]; the state entering the rank [1, H, K, K] fp32; gradients for o and the summary."""
    gen = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    L, H, K = tokens, heads, head_dim
    x = dict(q=randn(1, L, H, K).to(dtype), k=F.normalize(randn(1, L, H, K), dim=-1).to(dtype),
             v=randn(1, L, H, K).to(dtype), g=F.logsigmoid(randn(1, L, H) + 3.0),
             beta=torch.sigmoid(randn(1, L, H)).to(dtype))
    for t in x.values():
        t.requires_grad_()
    x.update(cu=torch.tensor([0, L], device=device, dtype=torch.int32),
             segment=torch.zeros(1, device=device, dtype=torch.long),
             state_in=randn(1, H, K, K) * 0.1, do=randn(1, L, H, K), dsummary=randn(1, H, K, 2 * K))
    return x


def plain(x: dict, backend: str) -> tuple[torch.Tensor, ...]:
    """The same rows in one pass from zero states: what a rank runs without context parallelism."""
    return (gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], cu_seqlens=x["cu"], backend=backend)[0],)


def middle_rank(x: dict, backend: str) -> tuple[torch.Tensor, ...]:
    """A middle rank's kernel work: both passes, the summary it hands on and its output given the state in."""
    o_zero, summary, readout = handing_on_passes(x["q"], x["k"], x["v"], x["g"], x["beta"], x["segment"],
                                                 x["segment"], True, True, cu_seqlens=x["cu"], backend=backend)
    return o_zero.float() + incoming_share(readout, x["state_in"], x["cu"], x["segment"]), summary


def loss(outputs: tuple[torch.Tensor, ...], x: dict) -> torch.Tensor:
    total = (outputs[0].float() * x["do"]).sum()
    return total + (outputs[1] * x["dsummary"]).sum() if len(outputs) > 1 else total


def median_ms(fn, device: torch.device, reps: int) -> float:
    """Median wall time of fn in ms: CUDA-event based on a GPU (triton's do_bench), perf_counter on a CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=max(reps, 1) * 20, return_mode="median")
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def check(x: dict, backend: str) -> float:
    """Relative error of the middle rank's output against one pass from the state that enters it."""
    with torch.no_grad():
        o, _ = middle_rank(x, backend)
        ref = gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x["state_in"],
                               cu_seqlens=x["cu"], backend=backend)[0].float()
    return ((o - ref).norm() / ref.norm()).item()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384, help="rows on the rank (one document)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=256, help="key and value head size")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backend", default="auto", help="gated_delta_rule backend: auto, triton or torch")
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    x = make_inputs(args.tokens, args.heads, args.head_dim, device, dtype)
    error = check(x, args.backend)
    print(f"middle rank's output against one pass from its incoming state: relative error {error:.1e}")
    result = dict(tokens=args.tokens, heads=args.heads, head_dim=args.head_dim, dtype=args.dtype,
                  device=str(device), check_rel_err=error)
    leaves = [x[name] for name in ("q", "k", "v", "g", "beta")]
    for name, work in (("plain", plain), ("middle_rank", middle_rank)):
        def forward(work=work):
            with torch.no_grad():
                work(x, args.backend)

        def forward_backward(work=work):
            torch.autograd.grad(loss(work(x, args.backend), x), leaves)

        result[f"{name}_fwd_ms"] = median_ms(forward, device, args.reps)
        result[f"{name}_fwd_bwd_ms"] = median_ms(forward_backward, device, args.reps)
    for part in ("fwd", "fwd_bwd"):
        result[f"ratio_{part}"] = result[f"middle_rank_{part}_ms"] / result[f"plain_{part}_ms"]
        print(f"{part:8s} plain {result[f'plain_{part}_ms']:8.3f} ms   middle rank "
              f"{result[f'middle_rank_{part}_ms']:8.3f} ms   ratio {result[f'ratio_{part}']:.2f}")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "bench_cp_rank.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
