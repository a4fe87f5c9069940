"""Sweep the short-conv Triton launch shapes (rows, channels, warps) at MoM-340M / GDN-340M sizes on the GPU.

Four launches are tuned separately: the forward and the backward's dz, dx and weight-grad (dw) passes. Each variant is first checked against the default launch (relative error), then timed (median
milliseconds). Shapes with an L2 norm (q and k, heads of 256 channels) use the head as the channel tile.
The fastest rows go into FWD_TILE / FWD_NORM_TILE / DZ_TILE / DZ_NORM_TILE / DX_TILE / DW_TILE in
mom_train/kernels/short_conv/varlen.py.

  python scripts/tune_short_conv.py [--launch dz --launch dw]
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mom_train.kernels.short_conv.varlen import (  # noqa: E402
    _channel_tiling, segment_index, short_conv_bwd, short_conv_fwd)

SHAPES = {
    # name: (rows, channels, row stride of x: a slice of MoM's [R, 2056] k/v projection buffer, or contiguous,
    #        L2-normalised head width or None)
    "MoM k+norm L=49152 C=1024 stride 2056": (49152, 1024, 2056, 256),
    "MoM q+norm L=49152 C=1024": (49152, 1024, 1024, 256),
    "MoM v  L=49152 C=1024 stride 2056": (49152, 1024, 2056, None),
    "GDN v  L=16384 C=2048": (16384, 2048, 2048, None),
}
# the backward's launches are timed as the whole backward with one launch's tile varied
LAUNCHES = ("fwd", "dz", "dx", "dw")
TILES = [(bt, bc, nw) for bt, bc, nw in itertools.product((4, 8, 16, 32, 64), (64, 128, 256), (4, 8))
         if 1024 <= bt * bc <= 16384]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launch", action="append", choices=LAUNCHES, help="tune only these launches")
    launches = parser.parse_args().launch or LAUNCHES
    torch.manual_seed(0)
    rows = []
    for name, (L, C, stride, norm_dim) in SHAPES.items():
        base = torch.randn(L, stride, device="cuda", dtype=torch.bfloat16)
        x = base[:, :C]
        w = torch.randn(C, 4, device="cuda")
        cu = torch.linspace(0, L, 25, device="cuda").to(torch.int32)
        seg, pos = segment_index(cu, L)
        dy = torch.randn(L, C, device="cuda", dtype=torch.bfloat16)

        def fwd(y, tile=None):
            return short_conv_fwd(x, w, None, seg, pos, "silu", y, tile=tile, norm_dim=norm_dim)

        def bwd(dx, tiles=None):
            return short_conv_bwd(x, w, None, seg, pos, "silu", dy, dx, 24, need_dstate=False, norm_dim=norm_dim,
                                  tiles=tiles)

        y_ref = fwd(torch.empty(L, C, device="cuda", dtype=x.dtype))
        dx_ref, dw_ref, _ = bwd(torch.empty_like(y_ref))
        seen = set()
        for tile in TILES:
            for launch in launches:
                # with a norm the channel tile is the head: time each launch shape once
                shape = _channel_tiling(C, tile, norm_dim if launch in ("fwd", "dz") else None)
                if (launch, shape) in seen:
                    continue
                seen.add((launch, shape))
                out = torch.full_like(y_ref, float("nan"))
                if launch == "fwd":
                    run = lambda: fwd(out, tile)  # noqa: E731
                else:
                    run = lambda: bwd(out, {launch: tile})  # noqa: E731
                try:
                    res = run()
                    err = rel(out, y_ref) if launch == "fwd" else max(rel(out, dx_ref), rel(res[1], dw_ref))
                    ms = triton.testing.do_bench(run, return_mode="median")
                except Exception as err_:  # a shape that does not compile is reported, not fatal
                    print(f"{name} {launch} {tile}: {err_!r}"[:200], flush=True)
                    continue
                rows.append((name, launch, tile, ms, err))
                print(f"{name:40s} {launch} tile={tile} {ms:.3f} ms err {err:.1e}", flush=True)
    print("\n| shape | launch | best tile | ms |\n|---|---|---|---|")
    for name in SHAPES:
        for launch in LAUNCHES:
            mine = [r for r in rows if r[0] == name and r[1] == launch]
            if mine:
                best = min(mine, key=lambda r: r[3])
                print(f"| {name} | {launch} | {best[2]} | {best[3]:.3f} |")
    # the tile that is best summed over the shapes of one kind (with / without a norm), per launch
    for with_norm in (False, True):
        kind = [n for n, shape in SHAPES.items() if (shape[3] is not None) == with_norm]
        for launch in LAUNCHES:
            totals, counts = {}, {}
            for r in rows:
                if r[0] in kind and r[1] == launch:
                    totals[r[2]] = totals.get(r[2], 0.0) + r[3]
                    counts[r[2]] = counts.get(r[2], 0) + 1
            complete = {t: v for t, v in totals.items() if counts[t] == len(kind)}
            if complete:
                best = min(complete, key=complete.get)
                print(f"best {launch} tile{' with norm' if with_norm else ''}: {best} ({complete[best]:.3f} ms summed)")

if __name__ == "__main__":
    main()
