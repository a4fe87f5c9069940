"""One training step (forward, backward, fused AdamW) of our MoM-340M / GDN-340M next to fla's, on one GPU.

Same work as the fla peer benchmark (8 x 2048 tokens, bf16 autocast, fused AdamW, median of CUDA-event
timings), in one process so the numbers sit side by side: fixed-length batches and the same tokens as
packed documents (cu_seqlens, same generator as the peer script). Prints a table and writes
$OUT/bench_model.json (or --out). One of our steps runs under torch.cuda.set_sync_debug_mode("error") to show
the forward/backward has no host sync; the result is recorded per model.

  python scripts/bench_model.py                       # ours + fla, fixed and packed
  python scripts/bench_model.py --skip fla --skip gdn # only our MoM
  python scripts/bench_model.py --cuda-graphs on       # our rows replayed from CUDA graphs only
  python scripts/bench_model.py --kernels             # also time the fused kernels against plain torch

fla is taken from the installed package, or installed from .gpu-wheels into /tmp/site (its Hopper guard on the
gated backward lifted for timing, as in the peer script). First use of a shape spends minutes in autotuning.
"""
from __future__ import annotations

import argparse
import gc
import glob
import importlib.util
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# run from a checkout without installing the package
sys.path.insert(0, str(REPO))
FLA_SITE = "/tmp/site"
FLA_GUARD = "if g is not None and IS_NVIDIA_HOPPER and TRITON_ABOVE_3_4_0"


def timeit(fn, warmup: int, iters: int) -> float:
    """Median milliseconds of fn() over iters runs after warmup runs (CUDA events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def make_batch(vocab_size: int, B: int, T: int, packed: bool, device: str) -> dict:
    """Random tokens [B, T], or the same count packed as documents of random lengths (the fla peer benchmark's generator)."""
    torch.manual_seed(0)
    if not packed:
        ids = torch.randint(0, vocab_size, (B, T), device=device)
        return dict(input_ids=ids, labels=ids)
    ids = torch.randint(0, vocab_size, (1, B * T), device=device)
    gen = torch.Generator().manual_seed(0)
    lengths, total = [], 0
    while total < B * T:
        length = min(int(torch.randint(64, 4096, (1,), generator=gen)), B * T - total)
        lengths.append(length)
        total += length
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), device=device, dtype=torch.int32)
    return dict(input_ids=ids, labels=ids, cu_seqlens=cu)


def sync_check(step_fn) -> str:
    """'ok' when step_fn runs without a host sync, else the error text."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step_fn()
        return "ok"
    except RuntimeError as err:
        return f"host sync: {str(err)[:300]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()


def bench_model(name: str, build, B: int, T: int, packed: bool, args, check_sync: bool,
                graphed: bool = False) -> dict:
    """Time one training step. graphed: forward + backward replayed from a CUDA graph (training.cuda_graphs:
    flat gradient buffer, captured on the first step, which the warmup steps absorb)."""
    model = build()
    num_params = sum(p.numel() for p in model.parameters())
    params = [p for p in model.parameters() if p.requires_grad]
    vocab_size = model.config.vocab_size
    batch = make_batch(vocab_size, B, T, packed, "cuda")

    if graphed:
        from mom_train.cuda_graph import FlatGrads, GraphedMicroBatch
        from mom_train.precision import autocast_for_capture

        grads = FlatGrads(params)
        micro_batch = GraphedMicroBatch(model, grads, autocast_for_capture(torch.bfloat16))
        # loss = mean CE + coef * aux, as model(...).loss (the scale's exact value does not change the work)
        ce_scale, aux_scale = 1.0 / (B * T), float(getattr(model.config, "aux_loss_coef", 0.0))

        def forward_backward():
            micro_batch(batch["input_ids"], batch["labels"], batch.get("cu_seqlens"), ce_scale, aux_scale)

        def zero_grad():
            grads.zero_()
    else:
        def forward_backward():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(**batch)
            out.loss.backward()

        def zero_grad():
            opt.zero_grad(set_to_none=True)

    opt = torch.optim.AdamW(params, lr=3e-4, fused=True)

    def step():
        forward_backward()
        opt.step()
        zero_grad()

    torch.cuda.reset_peak_memory_stats()
    ms = timeit(step, args.warmup, args.iters)
    peak = torch.cuda.max_memory_allocated() / 2**30
    loss_fn = getattr(model, "loss_fn", None)
    result = dict(name=name, params_M=num_params / 1e6, B=B, T=T, packed=packed, step_ms=ms,
                  tokens_per_s=B * T / (ms / 1e3), peak_GiB=peak, cuda_graph=graphed,
                  loss_fn=getattr(loss_fn, "__name__", "model's own"))
    if check_sync:
        result["sync_forward_backward"] = sync_check(forward_backward)
        result["sync_optimizer"] = sync_check(lambda: (opt.step(), zero_grad()))
    print(f"{name:52s} params={num_params / 1e6:7.1f}M packed={packed!s:5s} step={ms:8.1f} ms "
          f"tok/s={result['tokens_per_s']:10.0f} peak={peak:6.1f} GiB", flush=True)
    del opt, model, batch
    return result


def our_builder(config: str, fused_ce: bool, overrides: tuple[str, ...] = ()):
    from mom_train.config import load_config
    from mom_train.model import build_model

    cfg = load_config(REPO / "configs" / config, ["model.kernel_backend=triton", "model.mom_impl=fast", *overrides])

    def build():
        with torch.device("cuda"):
            model = build_model(cfg.model)
        if not fused_ce:
            from mom_train.loss import linear_cross_entropy

            # the plain head + cross entropy (full logits), for comparison with the fused one
            model.loss_fn = lambda hidden, weight, targets, fused: linear_cross_entropy(hidden, weight, targets)
        return model.train()
    return build


def import_fla():
    """fla's model classes, installing the wheels into /tmp/site when fla is missing; the Hopper guard is
    lifted in the source before fla is first imported."""
    spec = importlib.util.find_spec("fla")
    if spec is None:
        wheels = sorted(glob.glob(str(REPO / ".gpu-wheels" / "*.whl")))
        if not wheels:
            raise RuntimeError("fla is not installed and .gpu-wheels/ has no wheels; pass --skip fla")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--target", FLA_SITE, *wheels], check=True)
        sys.path.insert(0, FLA_SITE)
        importlib.invalidate_caches()
        spec = importlib.util.find_spec("fla")
    # timing only: fla refuses its gated backward on Hopper with Triton 3.4..3.7.0; the work is the same
    chunk_o = Path(spec.submodule_search_locations[0]) / "ops" / "common" / "chunk_o.py"
    text = chunk_o.read_text()
    if FLA_GUARD in text:
        if "fla" in sys.modules:
            print("warning: fla was imported before its Hopper guard could be lifted", flush=True)
        if not os.access(chunk_o, os.W_OK):
            print(f"warning: cannot lift the Hopper guard in read-only {chunk_o}", flush=True)
        else:
            chunk_o.write_text(text.replace(FLA_GUARD, "if False and g is not None"))
            print(f"lifted the Hopper guard in {chunk_o} (timing only)", flush=True)
    from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM, MomConfig, MomForCausalLM

    return MomConfig, MomForCausalLM, GatedDeltaNetConfig, GatedDeltaNetForCausalLM


def fla_builders() -> dict:
    MomConfig, MomForCausalLM, GatedDeltaNetConfig, GatedDeltaNetForCausalLM = import_fla()
    common = dict(hidden_size=1024, num_hidden_layers=24, vocab_size=32000, fuse_cross_entropy=True,
                  tie_word_embeddings=True)

    def mom():
        return MomForCausalLM(MomConfig(num_heads=4, head_dim=256, expand_v=1, hidden_ratio=3, num_memories=4,
                                        topk=2, shared_mem=True, **common)).cuda().train()

    def gdn():
        return GatedDeltaNetForCausalLM(GatedDeltaNetConfig(num_heads=4, head_dim=256, expand_v=2, hidden_ratio=4,
                                                            **common)).cuda().train()
    return {"mom": mom, "gdn": gdn}


def bench_kernels(args) -> list[dict]:
    """Forward+backward of each fused kernel against its unfused torch counterpart, at 340M sizes."""
    import torch.nn.functional as F

    from mom_train.kernels.fused_ce import fused_linear_cross_entropy
    from mom_train.kernels.gated_rmsnorm import gated_rmsnorm, naive_gated_rmsnorm
    from mom_train.kernels.short_conv import naive_short_conv, short_conv

    out = []
    L = 3 * 16384  # MoM buffer: T * (topk + shared) rows
    x = torch.randn(1, L, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    cu = torch.linspace(0, L, 25, device="cuda").to(torch.int32)
    conv_weight = torch.randn(1024, 4, device="cuda", requires_grad=True)
    g = torch.randn(8, 2048, 4, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    o = torch.randn_like(g, requires_grad=True)
    norm_weight = torch.ones(512, device="cuda", requires_grad=True)
    hidden = torch.randn(16384, 1024, device="cuda", requires_grad=True)
    head = torch.randn(32000, 1024, device="cuda", requires_grad=True)
    targets = torch.randint(0, 32000, (16384,), device="cuda")

    def linear_ce():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return F.cross_entropy(F.linear(hidden, head).float(), targets, reduction="sum")

    def fused_ce():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return fused_linear_cross_entropy(hidden, head, targets)[0]

    # the torch side is the fp32 definition (per-segment loop for the conv, 24 segments), not the model modules,
    # which may already route to these kernels on CUDA
    cases = [
        ("short_conv L=49152 C=1024 bf16", lambda: short_conv(x, conv_weight, cu)[0].sum(),
         lambda: naive_short_conv(x, conv_weight, cu)[0].sum()),
        ("gated_rmsnorm [8,2048,4,512] bf16", lambda: gated_rmsnorm(o, g, norm_weight).sum(),
         lambda: naive_gated_rmsnorm(o, g, norm_weight).sum()),
        ("linear+CE N=16384 D=1024 V=32000", fused_ce, linear_ce),
    ]
    for name, fused_fn, torch_fn in cases:
        row = dict(name=name)
        for label, fn in (("fused", fused_fn), ("torch", torch_fn)):
            try:
                torch.cuda.reset_peak_memory_stats()
                row[f"{label}_ms"] = timeit(lambda: fn().backward(), args.warmup, args.iters)
                row[f"{label}_peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
            except Exception as err:
                row[f"{label}_error"] = repr(err)[:300]
        print(f"{name:40s} fused {row.get('fused_ms', float('nan')):8.3f} ms   torch "
              f"{row.get('torch_ms', float('nan')):8.3f} ms", flush=True)
        out.append(row)
    return out


def print_table(rows: list[dict]) -> None:
    print(f"\n| model | packed | step ms | tokens/s | peak GiB | no host sync |\n|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['name']} | {r.get('packed')} | error: {r['error'][:80]} | | | |")
            continue
        print(f"| {r['name']} | {r['packed']} | {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | "
              f"{r['peak_GiB']:.1f} | {r.get('sync_forward_backward', '-')} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip", action="append", default=[],
                        help="skip a part: fla, ours, mom, gdn, fixed, packed (repeatable)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--no-fused-ce", action="store_true", help="keep the model's own loss_fn")
    parser.add_argument("--kernels", action="store_true", help="also time the fused kernels against torch")
    parser.add_argument("--mom-projection", nargs="+", default=["dense", "grouped"], choices=["dense", "grouped"],
                        help="our MoM's k/v/beta/a GEMM variants to time (model.mom_projection)")
    parser.add_argument("--cuda-graphs", choices=["off", "on", "both"], default="both",
                        help="our models: eager steps, CUDA-graph replays (training.cuda_graphs), or both rows")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "/tmp"), "bench_model.json"))
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    import triton

    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "models": []}

    def save():
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))

    todo = []
    if "ours" not in args.skip:
        fused = not args.no_fused_ce
        graph_modes = {"off": [False], "on": [True], "both": [False, True]}[args.cuda_graphs]
        for graphed in graph_modes:
            suffix = " + CUDA graph" if graphed else ""
            for projection in args.mom_projection:
                todo.append((f"ours MoM-340M ({projection} k/v GEMM){suffix}", "mom", graphed,
                             lambda p=projection: our_builder("mom_340m.yaml", fused,
                                                              (f"model.mom_projection={p}",))))
            todo.append((f"ours GatedDeltaNet-340M{suffix}", "gdn", graphed,
                         lambda: our_builder("gdn_340m.yaml", fused)))
    if "fla" not in args.skip:
        todo += [("fla MoM-340M", "mom", False, lambda: fla_builders()["mom"]),
                 ("fla GatedDeltaNet-340M", "gdn", False, lambda: fla_builders()["gdn"])]
    layouts = [p for p in (False, True) if ("packed" if p else "fixed") not in args.skip]
    for name, kind, graphed, get_builder in todo:
        if kind in args.skip:
            continue
        try:
            build = get_builder()
        except Exception as err:
            traceback.print_exc()
            res["models"].append(dict(name=name, error=f"build: {err!r}"[:500]))
            save()
            continue
        for packed in layouts:
            full_name = f"{name}{' packed' if packed else ''}"
            try:
                res["models"].append(bench_model(full_name, build, args.batch, args.seq_len, packed, args,
                                                 check_sync=name.startswith("ours"), graphed=graphed))
            except Exception as err:
                traceback.print_exc()
                res["models"].append(dict(name=full_name, packed=packed, error=repr(err)[:500]))
            gc.collect()
            torch.cuda.empty_cache()
            save()
    if args.kernels:
        try:
            res["kernels"] = bench_kernels(args)
        except Exception as err:
            traceback.print_exc()
            res["kernels"] = dict(error=repr(err)[:500])
    save()
    print_table(res["models"])
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
