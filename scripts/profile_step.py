"""Where one training step of a model's config spends GPU time and memory.

Runs our model (fast MoM path, Triton kernels, fused CE) on 8 x 2048 tokens in bf16 autocast with fused
AdamW, then prints:
- forward / backward / optimizer milliseconds (CUDA events, median of --iters),
- activation memory (allocated after forward minus before), parameter + optimizer memory, peak,
- the ops that take the most GPU time under torch.profiler (self device time, per step).

  python scripts/profile_step.py --config mom_340m.yaml [--config gdn_340m.yaml] [--packed]

Writes $OUT/profile_<name>.txt (or /tmp) with the full op table.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_model import make_batch, our_builder  # noqa: E402


def median_ms(events: list[tuple]) -> float:
    times = sorted(start.elapsed_time(end) for start, end in events)
    return times[len(times) // 2]


def profile_config(config: str, args) -> None:
    model = our_builder(config, fused_ce=True, overrides=tuple(args.set))()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
    batch = make_batch(model.config.vocab_size, args.batch, args.seq_len, args.packed, "cuda")
    phases = {"forward": [], "backward": [], "optimizer": []}
    activation_gib = 0.0

    def step(record: bool):
        nonlocal activation_gib
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        before = torch.cuda.memory_allocated()
        marks[0].record()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(**batch)
        marks[1].record()
        activation_gib = (torch.cuda.memory_allocated() - before) / 2**30
        out.loss.backward()
        marks[2].record()
        opt.step()
        opt.zero_grad(set_to_none=True)
        marks[3].record()
        if record:
            for name, i in (("forward", 0), ("backward", 1), ("optimizer", 2)):
                phases[name].append((marks[i], marks[i + 1]))

    for _ in range(args.warmup):
        step(False)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(args.iters):
        step(True)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30
    state_gib = torch.cuda.memory_allocated() / 2**30
    total = sum(median_ms(v) for v in phases.values())
    name = Path(config).stem + ("_packed" if args.packed else "") + "".join("_" + o.split("=")[-1] for o in args.set)
    lines = [f"== {name}: step {total:.1f} ms = " + ", ".join(f"{k} {median_ms(v):.1f}" for k, v in phases.items())
             + f"; tokens/s {args.batch * args.seq_len / total * 1e3:,.0f}",
             f"   memory: params+grads+optimizer {state_gib:.2f} GiB, activations {activation_gib:.2f} GiB, "
             f"peak {peak:.2f} GiB"]

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step(False)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=70)
    lines.append(table)
    text = "\n".join(lines)
    print(text, flush=True)
    out_dir = Path(os.environ.get("OUT", "/tmp"))
    (out_dir / f"profile_{name}.txt").write_text(text)
    del model, opt, batch
    torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", default=[], help="config file name under configs/")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--packed", action="store_true")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--rows", type=int, default=45)
    parser.add_argument("--set", action="append", default=[], help="config override, e.g. model.mom_projection=grouped")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    for config in args.config or ["mom_340m.yaml"]:
        profile_config(config, args)


if __name__ == "__main__":
    main()
