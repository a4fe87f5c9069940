"""Short conv: Triton kernel (under TRITON_INTERPRET=1, in a subprocess) and decode step vs the naive definition.

The interpreter must be switched on before triton is imported, and the rest of the suite may import triton
first, so the kernel cases run once in a child process (this file run as a script) and report relative
errors as JSON; each parametrised test checks its own case.
"""
from __future__ import annotations

import json

import pytest
import torch

from mom_train.kernels.short_conv import naive_short_conv, short_conv, short_conv_step
from tests.kernels.interpreter import run_in_interpreter

# name: (lengths of the packed segments, or (B, T) for a padded batch, C, W, state, activation, dtype,
#        x a column slice of a wider buffer)
CASES = {
    "packed-odd-empty-W4-state": ([1, 0, 63, 65, 1, 3, 0], 12, 4, True, "silu", "float32", False),
    "packed-W4-nostate": ([5, 63, 2, 65], 12, 4, False, "silu", "float32", False),
    "batch-B3-T65-W4-state": ((3, 65), 10, 4, True, "silu", "float32", False),
    "batch-B2-T1-W4-nostate": ((2, 1), 8, 4, False, "silu", "float32", False),
    "packed-W1": ([7, 0, 9], 6, 1, True, "silu", "float32", False),
    "packed-W2-identity": ([1, 30, 2], 6, 2, True, None, "float32", False),
    "packed-W7-short-segments": ([1, 2, 0, 3, 40], 5, 7, True, "silu", "float32", False),
    "packed-C130-two-channel-blocks": ([33, 1, 36], 130, 4, True, "silu", "float32", False),
    "packed-bf16": ([17, 63, 0, 48], 16, 4, True, "silu", "bfloat16", False),
    "batch-strided-x": ((2, 33), 9, 4, True, "silu", "float32", True),
}
# the launchers called directly: NaN-poisoned outputs, several row blocks per backward program, and each head
# of norm_dim channels L2-normalised after the activation (a width that is not a power of two, too)
# name: (segment lengths, C, W, norm_dim)
LAUNCH_CASES = {
    "poisoned-num_sub4": ([1, 70, 0, 5, 67, 1], 20, 4, None),
    "l2norm-heads-of-8": ([1, 63, 0, 65, 2], 24, 4, 8),
    "l2norm-heads-of-12": ([500, 1, 3], 36, 4, 12),
}
TOL = {"float32": 1e-5, "bfloat16": 2e-2}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _inputs(layout, C: int, W: int, with_state: bool, dtype: torch.dtype, seed: int = 0, strided: bool = False):
    """(x, weight, cu_seqlens, state, leaf that holds x's gradient)."""
    gen = torch.Generator().manual_seed(seed)
    if isinstance(layout, tuple):
        B, T = layout
        cu = None
        num_seqs = B
    else:
        B, T = 1, sum(layout)
        cu = torch.tensor([0] + layout, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        num_seqs = len(layout)
    x_leaf = torch.randn(B, T, 2 * C if strided else C, generator=gen).to(dtype).requires_grad_()
    x = x_leaf[..., C:] if strided else x_leaf
    w = torch.randn(C, W, generator=gen).requires_grad_()
    state = torch.randn(num_seqs, C, W - 1, generator=gen).requires_grad_() if with_state else None
    return x, w, cu, state, x_leaf


def _run_case(layout, C, W, with_state, activation, dtype_name, strided) -> dict[str, float]:
    dtype = getattr(torch, dtype_name)
    x, w, cu, state, x_leaf = _inputs(layout, C, W, with_state, dtype, strided=strided)
    leaves = [t for t in (x_leaf, w, state) if t is not None]
    y, final = short_conv(x, w, cu, state, output_final_state=True, activation=activation)
    ref_y, ref_final = naive_short_conv(x, w, cu, state, output_final_state=True, activation=activation)
    gen = torch.Generator().manual_seed(1)
    dy = torch.randn(y.shape, generator=gen).to(dtype)
    dfinal = torch.randn(ref_final.shape, generator=gen)
    grads = torch.autograd.grad((y.float() * dy).sum() + (final.float() * dfinal).sum(), leaves)
    ref = torch.autograd.grad((ref_y.float() * dy).sum() + (ref_final * dfinal).sum(), leaves)
    errs = {"y": _rel(y, ref_y), "final_state": _rel(final, ref_final) if W > 1 else 0.0}
    for name, g, r in zip(("dx", "dweight", "dstate"), grads, ref):
        errs[name] = _rel(g, r) if r.numel() else 0.0
    return errs


def _l2norm_heads(y: torch.Tensor, norm_dim: int) -> torch.Tensor:
    """Each group of norm_dim channels of y [..., C] scaled to unit L2 norm (eps 1e-6 under the root)."""
    heads = y.unflatten(-1, (-1, norm_dim))
    return (heads * torch.rsqrt(heads.square().sum(-1, keepdim=True) + 1e-6)).flatten(-2)


def _run_launch_case(lengths, C, W, norm_dim) -> dict[str, float]:
    from mom_train.kernels.short_conv.varlen import segment_index, short_conv_bwd, short_conv_fwd

    x, w, cu, state, _ = _inputs(lengths, C, W, True, torch.float32, seed=2)
    x2 = x[0].detach()
    seg, pos = segment_index(cu, x2.shape[0])
    y = torch.full_like(x2, float("nan"))
    state_t = state.detach().transpose(1, 2).contiguous()  # the launchers take [N, W-1, C]
    short_conv_fwd(x2, w.detach(), state_t, seg, pos, "silu", y, norm_dim=norm_dim)
    dy = torch.randn_like(x2)
    dx = torch.full_like(x2, float("nan"))
    dx, dweight, dstate = short_conv_bwd(x2, w.detach(), state_t, seg, pos, "silu", dy, dx,
                                         len(lengths), num_sub=4, norm_dim=norm_dim)
    ref_y, _ = naive_short_conv(x, w, cu, state)
    if norm_dim is not None:
        ref_y = _l2norm_heads(ref_y, norm_dim)
    ref = torch.autograd.grad((ref_y[0] * dy).sum(), (x, w, state))
    return {"y": _rel(y, ref_y[0]), "dx": _rel(dx, ref[0][0]), "dweight": _rel(dweight, ref[1]),
            "dstate": _rel(dstate.transpose(1, 2), ref[2])}


@pytest.fixture(scope="module")
def interpreter_results() -> dict:
    return run_in_interpreter(__file__)


@pytest.mark.parametrize("name", list(CASES) + list(LAUNCH_CASES))
def test_triton_matches_naive(interpreter_results, name):
    errs = interpreter_results[name]
    dtype = CASES[name][5] if name in CASES else "float32"
    bad = {k: v for k, v in errs.items() if not v <= TOL[dtype]}
    assert not bad, f"{name}: relative errors above {TOL[dtype]}: {bad}"


@pytest.mark.parametrize("W", [2, 4])
def test_decode_steps_match_full_sequence(W):
    B, T, C = 3, 9, 7
    x = torch.randn(B, T, C)
    w = torch.randn(C, W)
    state0 = torch.randn(B, C, W - 1)
    ref_y, ref_final = naive_short_conv(x, w, initial_state=state0, output_final_state=True)
    state, ys = state0, []
    for t in range(T):
        y, state = short_conv(x[:, t:t + 1], w, initial_state=state, output_final_state=True)
        ys.append(y)
    assert _rel(torch.cat(ys, 1), ref_y) < 1e-6
    assert _rel(state, ref_final) < 1e-6
    y1, s1 = short_conv_step(x[:, 0], w, state0)
    assert _rel(y1, ref_y[:, 0]) < 1e-6 and s1.shape == state0.shape


def test_naive_matches_model_conv():
    """The definition agrees with the model's plain-torch ShortConvolution (packed, state, final state)."""
    from mom_train.model.conv import ShortConvolution

    conv = ShortConvolution(6, 4)
    lengths = [3, 0, 20, 1]
    x, _, cu, state, _ = _inputs(lengths, 6, 4, True, torch.float32)
    y, final = conv(x, cu, state, True)
    ref_y, ref_final = naive_short_conv(x, conv.weight, cu, state, output_final_state=True)
    assert _rel(y, ref_y) < 1e-6 and _rel(final, ref_final) < 1e-6


def test_bad_inputs_name_the_problem():
    x = torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match="packed"):
        short_conv(x, torch.randn(4, 4), torch.tensor([0, 5, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match="initial_state"):
        short_conv(x, torch.randn(4, 4), initial_state=torch.randn(2, 4, 2))
    with pytest.raises(ValueError, match="weight"):
        short_conv(x, torch.randn(3, 4))


if __name__ == "__main__":
    # child process (TRITON_INTERPRET=1): one JSON line of relative errors per case
    torch.manual_seed(0)
    results = {name: _run_case(*case) for name, case in CASES.items()}
    results.update({name: _run_launch_case(*case) for name, case in LAUNCH_CASES.items()})
    print(json.dumps(results))
