"""Short conv + chunked gated delta rule as one function (conv outputs rebuilt in backward), under the Triton
interpreter in a child process, against the float64 definition (naive conv, then the naive recurrence).

Cases: packed segments of lengths 1, 63, 0, 65 (and a 130-token batch), value heads split into parts, and
inputs that are column slices of one wider projection buffer, as in the MoM layer.
"""
from __future__ import annotations

import json

import pytest
import torch

from tests.kernels.interpreter import run_in_interpreter

# name: (segment lengths, heads, K, V, value part width, layout): inputs as separate tensors, as column slices
# of one buffer, or with k and v passed together as one kv_in tensor
CASES = {
    "varlen_1_63_0_65": ([1, 63, 0, 65], 2, 16, 16, 256, "separate"),
    "split_value_heads": ([40, 25], 2, 16, 32, 16, "separate"),
    "buffer_slices_130": ([130], 1, 32, 16, 256, "slices"),
    "joined_kv_varlen": ([3, 0, 70, 1], 2, 16, 32, 256, "joined"),
}
FIELDS = ["o", "dq_in", "dk_in", "dv_in", "dw_q", "dw_k", "dw_v", "dg", "dbeta"]
TOL = 1e-4


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def _reference(q_in, k_in, v_in, weights, g, beta, cu, H, K):
    from mom_train.kernels.gated_delta_rule.naive import naive_recurrent_gated_delta_rule
    from mom_train.kernels.short_conv.naive import naive_short_conv

    q, k, v = (naive_short_conv(x[None], w, cu)[0][0] for x, w in zip((q_in, k_in, v_in), weights))
    L = q.shape[0]
    o, _ = naive_recurrent_gated_delta_rule(q.view(1, L, H, K), k.view(1, L, H, K), v.view(1, L, H, -1),
                                            g[None], beta[None], cu_seqlens=cu, use_qk_l2norm_in_kernel=True)
    return o[0]


def _run_case(lengths, H, K, V, part, layout) -> dict[str, float]:
    from mom_train.kernels.gated_delta_rule.conv_chunk import conv_chunk_gated_delta_rule

    gen = torch.Generator().manual_seed(len(lengths) * 7 + V)
    L = sum(lengths)
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    widths = (H * K, H * K, H * V)
    if layout == "slices":
        base = torch.randn(L, sum(widths) + 3, generator=gen)
        inputs = list(base.split(list(widths) + [3], 1)[:3])
    else:
        inputs = [torch.randn(L, w, generator=gen) for w in widths]
    weights = [torch.randn(w, 4, generator=gen) * 0.5 for w in widths]
    g = torch.nn.functional.logsigmoid(torch.randn(L, H, generator=gen) + 2.0)
    beta = torch.rand(L, H, generator=gen)
    do = torch.randn(L, H, V, generator=gen)
    leaves = [x.clone().requires_grad_() for x in inputs + weights + [g, beta]]
    if layout == "joined":
        kv = torch.cat(leaves[1:3], 1).detach().requires_grad_()
        o = conv_chunk_gated_delta_rule(leaves[0], None, None, tuple(leaves[3:6]), leaves[6], leaves[7], cu, K,
                                        max_head_v_dim=part, kv_in=kv)
        grads = list(torch.autograd.grad((o * do).sum(), [leaves[0], kv] + leaves[3:]))
        grads[1:2] = grads[1].split([H * K, H * V], 1)
    else:
        o = conv_chunk_gated_delta_rule(*leaves[:3], tuple(leaves[3:6]), leaves[6], leaves[7], cu, K,
                                        max_head_v_dim=part)
        grads = torch.autograd.grad((o * do).sum(), leaves)
    ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
    ref_o = _reference(*ref_leaves[:3], ref_leaves[3:6], ref_leaves[6], ref_leaves[7], cu, H, K)
    ref_grads = torch.autograd.grad((ref_o * do.double()).sum(), ref_leaves)
    errs = {"o": _rel(o, ref_o)}
    for name, a, b in zip(FIELDS[1:], grads, ref_grads):
        errs[name] = _rel(a, b)
    return errs


@pytest.fixture(scope="module")
def interpreter_errors() -> dict:
    return run_in_interpreter(__file__)


@pytest.mark.parametrize("case", list(CASES))
def test_matches_definition(interpreter_errors, case):
    errs = interpreter_errors[case]
    assert set(FIELDS) <= set(errs), f"missing: {set(FIELDS) - set(errs)}"
    bad = {k: v for k, v in errs.items() if not v < TOL}
    assert not bad, f"{case}: relative errors above {TOL} (inf = NaN/unwritten): {bad}"


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(json.dumps({name: _run_case(*spec) for name, spec in CASES.items()}))
