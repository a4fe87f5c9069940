"""Sweep the short-conv Triton launch shapes (rows, channels, warps) at MoM-340M / GDN-340M sizes on the GPU.

Checks each variant against the default launch first (relative error), then prints the median milliseconds
of the forward and of the backward (both passes) per shape; the fastest rows go into FWD_TILE / BWD_TILE in
mom_train/kernels/short_conv/varlen.py.

  python scripts/tune_short_conv.py
"""
from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mom_train.kernels.short_conv.varlen import segment_index, short_conv_bwd, short_conv_fwd  # noqa: E402

SHAPES = {
    # name: (rows, channels, row stride of x: a k slice of MoM's [R, 2056] projection buffer, or contiguous)
    "MoM k  L=49152 C=1024 stride 2056": (49152, 1024, 2056),
    "MoM q  L=49152 C=1024": (49152, 1024, 1024),
    "GDN v  L=16384 C=2048": (16384, 2048, 2048),
}
TILES = [(bt, bc, nw) for bt, bc, nw in itertools.product((16, 32, 64), (64, 128, 256), (4, 8)) if bt * bc <= 8192]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main() -> None:
    torch.manual_seed(0)
    rows = []
    for name, (L, C, stride) in SHAPES.items():
        base = torch.randn(L, stride, device="cuda", dtype=torch.bfloat16)
        x = base[:, :C]
        w = torch.randn(C, 4, device="cuda")
        cu = torch.linspace(0, L, 25, device="cuda").to(torch.int32)
        seg, pos = segment_index(cu, L)
        dy = torch.randn(L, C, device="cuda", dtype=torch.bfloat16)
        y_ref = short_conv_fwd(x, w, None, seg, pos, "silu", torch.empty(L, C, device="cuda", dtype=x.dtype))
        dx_ref, dw_ref, _ = short_conv_bwd(x, w, None, seg, pos, "silu", dy, torch.empty_like(y_ref), 24)
        for tile in TILES:
            y = torch.full_like(y_ref, float("nan"))
            dx = torch.full_like(y_ref, float("nan"))
            try:
                short_conv_fwd(x, w, None, seg, pos, "silu", y, tile=tile)
                _, dw, _ = short_conv_bwd(x, w, None, seg, pos, "silu", dy, dx, 24, tile=tile)
                err = max(rel(y, y_ref), rel(dx, dx_ref), rel(dw, dw_ref))
                fwd = triton.testing.do_bench(lambda: short_conv_fwd(x, w, None, seg, pos, "silu", y, tile=tile),
                                              return_mode="median")
                bwd = triton.testing.do_bench(
                    lambda: short_conv_bwd(x, w, None, seg, pos, "silu", dy, dx, 24, tile=tile), return_mode="median")
            except Exception as err_:  # a shape that does not compile is reported, not fatal
                print(f"{name} {tile}: {err_!r}"[:200], flush=True)
                continue
            rows.append((name, tile, fwd, bwd, err))
            print(f"{name:36s} tile={tile} fwd {fwd:.3f} ms bwd {bwd:.3f} ms err {err:.1e}", flush=True)
    print("\n| shape | best fwd tile | fwd ms | best bwd tile | bwd ms |\n|---|---|---|---|---|")
    for name in SHAPES:
        mine = [r for r in rows if r[0] == name]
        f = min(mine, key=lambda r: r[2])
        b = min(mine, key=lambda r: r[3])
        print(f"| {name} | {f[1]} | {f[2]:.3f} | {b[1]} | {b[3]:.3f} |")
    # the tile that is best summed over the shapes
    for col, label in ((2, "fwd"), (3, "bwd")):
        totals = {}
        for r in rows:
            totals.setdefault(r[1], 0.0)
            totals[r[1]] += r[col]
        best = min(totals, key=totals.get)
        print(f"best {label} tile over all shapes: {best} ({totals[best]:.3f} ms summed)")


if __name__ == "__main__":
    main()
