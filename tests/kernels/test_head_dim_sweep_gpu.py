"""GPU sweep over head sizes: every kernel that takes a head or feature size, at every size a user may pick,
against its fp32/fp64 definition. Run it whenever a kernel or a launch setting changes:

    python -m pytest -n 16 -m gpu tests/kernels/test_head_dim_sweep_gpu.py

Compiled kernels can be wrong where the interpreter is right (Triton on Hopper miscompiled the WY kernels at
bf16 K=32 V=64 and K=64 V=32), so the CPU interpreter tests cannot stand in for this. Every buffer the chunk
kernels allocate is NaN-filled first; errors are relative (fp32 < 1e-3, bf16/fp16 < 1e-2).
"""
from __future__ import annotations

import itertools
import os

import pytest
import torch
import torch.nn.functional as F

from tests.kernels.gdr_check import compare, make_inputs, poison_buffers, reference_f64, rel_err

pytestmark = pytest.mark.gpu

HEAD_DIMS = (16, 32, 64, 100, 128, 256)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOL = {torch.float32: 1e-3, torch.bfloat16: 1e-2, torch.float16: 1e-2}
# fixed-length rows crossing chunk boundaries with every option off, and packed documents with empty and
# length-1 segments with every option on (l2norm in the kernel, initial and final state)
LAYOUTS = {"fixed-plain": dict(B=2, T=130, l2=False, h0=False, final=False),
           "packed-l2-h0-final": dict(lengths=[1, 63, 0, 65, 130], l2=True, h0=True, final=True)}
PAIRS = list(itertools.product(HEAD_DIMS, HEAD_DIMS))


def _check(errs: dict, dtype: torch.dtype, label: str) -> None:
    line = f"{label}: " + " ".join(f"{k}={v:.1e}" for k, v in errs.items())
    print("\n" + line)
    if os.environ.get("MOM_SWEEP_TABLE"):
        # one line per case for the report table (the run sets the file; pytest captures print)
        with open(os.environ["MOM_SWEEP_TABLE"], "a") as f:
            f.write(line + "\n")
    bad = {k: v for k, v in errs.items() if not v < TOL[dtype]}
    assert not bad, f"{label}: relative errors at or above {TOL[dtype]} (NaN = unwritten/non-finite): {bad}"


@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("K,V", PAIRS, ids=[f"K{k}-V{v}" for k, v in PAIRS])
def test_chunk_gated_delta_rule(K, V, dtype, layout):
    poison_buffers()
    errs = compare(dict(H=2, K=K, V=V, **LAYOUTS[layout]), "cuda", DTYPES[dtype], seed=K * 1000 + V)
    assert errs.pop("dtypes_ok") == 1.0, "o or a gradient has the wrong dtype"
    _check(errs, DTYPES[dtype], f"chunk K={K} V={V} {dtype} {layout}")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("K,V", PAIRS, ids=[f"K{k}-V{v}" for k, v in PAIRS])
def test_conv_chunk_gated_delta_rule(K, V, dtype):
    """The training path of the recurrent layers: three short convs (+ SiLU, q/k L2-normalised per head) fused
    with the chunked delta rule, against the float64 conv and the float64 recurrence."""
    from mom_train.kernels.gated_delta_rule.conv_chunk import conv_chunk_gated_delta_rule
    from mom_train.kernels.short_conv.naive import naive_short_conv

    dt = DTYPES[dtype]
    torch.manual_seed(K + 7 * V)
    H, lengths = 2, [1, 63, 0, 65, 130]
    L = sum(lengths)
    cu = torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32)
    inputs = [torch.randn(L, H * d, device="cuda").to(dt) for d in (K, K, V)]
    weights = [torch.randn(x.shape[1], 4, device="cuda") * 0.5 for x in inputs]
    g = F.logsigmoid(torch.randn(L, H, device="cuda") + 2.0)
    beta = torch.rand(L, H, device="cuda").to(dt)
    do = torch.randn(L, H, V, device="cuda")
    leaves = [x.detach().clone().requires_grad_() for x in inputs + weights + [g, beta]]
    o = conv_chunk_gated_delta_rule(*leaves[:3], tuple(leaves[3:6]), leaves[6], leaves[7], cu, K)
    grads = torch.autograd.grad((o.float() * do).sum(), leaves)

    ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
    q, k, v = (naive_short_conv(x[None], w, cu)[0] for x, w in zip(ref_leaves[:3], ref_leaves[3:6]))
    ref_o, _ = reference_f64(q.view(1, L, H, K), k.view(1, L, H, K), v.view(1, L, H, V), ref_leaves[6][None],
                             ref_leaves[7][None], cu_seqlens=cu, use_qk_l2norm_in_kernel=True)
    ref_grads = torch.autograd.grad((ref_o[0] * do.double()).sum(), ref_leaves)
    names = ["dq_in", "dk_in", "dv_in", "dw_q", "dw_k", "dw_v", "dg", "dbeta"]
    errs = {"o": rel_err(o, ref_o[0]) if torch.isfinite(o).all() else float("nan")}
    errs.update({n: rel_err(a, b) if torch.isfinite(a).all() else float("nan")
                 for n, a, b in zip(names, grads, ref_grads)})
    _check(errs, dt, f"conv_chunk K={K} V={V} {dtype}")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("K,V", PAIRS, ids=[f"K{k}-V{v}" for k, v in PAIRS])
def test_fused_recurrent_decode(K, V, dtype):
    """Decoding (forward only): packed prompts with empty and length-1 segments, initial and final state."""
    from mom_train.kernels.gated_delta_rule.fused_recurrent import fused_recurrent_gated_delta_rule

    dt = DTYPES[dtype]
    gen = torch.Generator().manual_seed(K * 3 + V)
    lengths = [1, 0, 5, 2]
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32).cuda()
    x = make_inputs(1, sum(lengths), 2, K, V, len(lengths), dt, "cuda", with_h0=True, l2=True, generator=gen)
    args = (x["q"], x["k"], x["v"], x["g"], x["beta"])
    o, ht = fused_recurrent_gated_delta_rule(*args, initial_state=x["initial_state"].clone(), output_final_state=True,
                                             cu_seqlens=cu, use_qk_l2norm_in_kernel=True)
    ref_o, ref_ht = reference_f64(*args, initial_state=x["initial_state"], output_final_state=True, cu_seqlens=cu,
                                  use_qk_l2norm_in_kernel=True)
    _check({"o": rel_err(o, ref_o), "ht": rel_err(ht, ref_ht)}, dt, f"fused_recurrent K={K} V={V} {dtype}")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_gated_rmsnorm(D, dtype):
    """The per-head gated RMSNorm of the recurrent layers' outputs, over the value head size."""
    from mom_train.kernels.gated_rmsnorm import gated_rmsnorm
    from mom_train.kernels.gated_rmsnorm.naive import naive_gated_rmsnorm

    dt = DTYPES[dtype]
    torch.manual_seed(D)
    x, gate = (torch.randn(333, 3, D, device="cuda").to(dt).requires_grad_() for _ in range(2))
    weight = (1 + 0.1 * torch.randn(D, device="cuda")).requires_grad_()
    dy = torch.randn(333, 3, D, device="cuda").to(dt)
    y = gated_rmsnorm(x, gate, weight)
    grads = torch.autograd.grad((y.float() * dy.float()).sum(), (x, gate, weight))
    ref_in = [t.detach().double().requires_grad_() for t in (x, gate, weight)]
    ref = naive_gated_rmsnorm(*ref_in)
    ref_grads = torch.autograd.grad((ref * dy.double()).sum(), ref_in)
    errs = {"y": rel_err(y, ref)}
    errs.update({n: rel_err(a, b) for n, a, b in zip(("dx", "dgate", "dweight"), grads, ref_grads)})
    _check(errs, dt, f"gated_rmsnorm D={D} {dtype}")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_short_conv(D, dtype):
    """The varlen short conv over H=3 heads of size D (channels 3*D), initial and final state."""
    from mom_train.kernels.short_conv import short_conv
    from mom_train.kernels.short_conv.naive import naive_short_conv

    dt = DTYPES[dtype]
    torch.manual_seed(D + 1)
    lengths = [1, 63, 0, 65, 130]
    cu = torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32)
    C, L = 3 * D, sum(lengths)
    x = torch.randn(1, L, C, device="cuda").to(dt).requires_grad_()
    w = (torch.randn(C, 4, device="cuda") * 0.5).requires_grad_()
    h0 = torch.randn(len(lengths), C, 3, device="cuda").to(dt).requires_grad_()
    dy = torch.randn(1, L, C, device="cuda").to(dt)
    y, _ = short_conv(x, w, cu, h0, False, "silu")
    grads = torch.autograd.grad((y.float() * dy.float()).sum(), (x, w, h0))
    ref_in = [t.detach().double().requires_grad_() for t in (x, w, h0)]
    ref, _ = naive_short_conv(ref_in[0], ref_in[1], cu, ref_in[2])
    ref_grads = torch.autograd.grad((ref * dy.double()).sum(), ref_in)
    errs = {"y": rel_err(y, ref)}
    errs.update({n: rel_err(a, b) for n, a, b in zip(("dx", "dweight", "dh0"), grads, ref_grads)})
    _check(errs, dt, f"short_conv D={D} {dtype}")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_routing_permutations(D, dtype):
    """Gather / select / combine of the MoM buffer at feature widths of 2 heads of size D (k|v widths)."""
    from tests.kernels.test_routing_gpu import run_permutations_against_torch

    run_permutations_against_torch(2 * D, None, DTYPES[dtype])
