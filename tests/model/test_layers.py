"""Layer-level tests: short convolution (varlen, state, gradients), norms, MLP sizing, RoPE, GDN init."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mom_train.config import ModelConfig
from mom_train.model.attention import apply_rope
from mom_train.model.conv import ShortConvolution
from mom_train.kernels import naive_recurrent_gated_delta_rule
from mom_train.model.gated_deltanet import MAX_KERNEL_VALUE_DIM, GatedDeltaNet, wide_value_gated_delta_rule
from mom_train.model.linear import make_linear
from mom_train.model.mlp import mlp_intermediate_size
from mom_train.model.norm import GatedRMSNorm, RMSNorm


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


def reference_conv(conv: ShortConvolution, x: torch.Tensor, state: torch.Tensor | None) -> tuple[torch.Tensor,
                                                                                                  torch.Tensor]:
    """One document, by the definition: x [L, C], state [C, W-1] -> y [L, C], final state [C, W-1]."""
    W = conv.kernel_size
    if state is None:
        state = x.new_zeros(x.shape[1], W - 1)
    padded = torch.cat((state.t(), x), 0)  # [W-1+L, C]
    rows = []
    for t in range(x.shape[0]):
        y = (padded[t:t + W].t() * conv.weight).sum(-1)
        if conv.bias is not None:
            y = y + conv.bias
        rows.append(F.silu(y))
    y = torch.stack(rows) if rows else x.new_zeros(0, x.shape[1])
    return y, padded[-(W - 1):].t()


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "initial_state"])
def test_conv_varlen_matches_each_document(with_state: bool, bias: bool):
    C, W = 6, 4
    conv = ShortConvolution(C, W, bias=bias)
    lengths = [5, 0, 1, 2, 9, 3, 0]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    x = torch.randn(1, sum(lengths), C, requires_grad=True)
    state = torch.randn(len(lengths), C, W - 1, requires_grad=True) if with_state else None
    y, final = conv(x, cu_seqlens=cu, initial_state=state, output_final_state=True)

    ref_y, ref_final = [], []
    for n in range(len(lengths)):
        a, b = cu[n].item(), cu[n + 1].item()
        yn, fn = reference_conv(conv, x[0, a:b], state[n] if with_state else None)
        ref_y.append(yn)
        ref_final.append(fn)
    ref_y, ref_final = torch.cat(ref_y)[None], torch.stack(ref_final)
    assert rel_err(y, ref_y) < 1e-6
    assert rel_err(final, ref_final) < 1e-6

    # gradients of x, weight (and state) agree with the definition
    dy, dfinal = torch.randn_like(y), torch.randn_like(final)
    inputs = [x, conv.weight] + ([state] if with_state else [])
    grads = torch.autograd.grad((y * dy).sum() + (final * dfinal).sum(), inputs)
    ref_grads = torch.autograd.grad((ref_y * dy).sum() + (ref_final * dfinal).sum(), inputs)
    for g, rg in zip(grads, ref_grads):
        assert rel_err(g, rg) < 1e-6


def test_conv_padded_batch_equals_rows():
    conv = ShortConvolution(5, 4)
    x = torch.randn(3, 7, 5)
    state = torch.randn(3, 5, 3)
    y, final = conv(x, initial_state=state, output_final_state=True)
    for b in range(3):
        yb, fb = reference_conv(conv, x[b], state[b])
        assert rel_err(y[b], yb) < 1e-6
        assert rel_err(final[b], fb) < 1e-6


def test_conv_decode_equals_full():
    conv = ShortConvolution(4, 4)
    x = torch.randn(2, 9, 4)
    full, full_state = conv(x, output_final_state=True)
    # prefill 2 tokens (shorter than the window), then one token at a time
    y, state = conv(x[:, :2], output_final_state=True)
    outs = [y]
    for t in range(2, 9):
        y, state = conv(x[:, t:t + 1], initial_state=state, output_final_state=True)
        outs.append(y)
    assert rel_err(torch.cat(outs, 1), full) < 1e-6
    assert rel_err(state, full_state) < 1e-6


def test_conv_rejects_bad_state_shape():
    conv = ShortConvolution(4, 4)
    with pytest.raises(ValueError, match="initial_state"):
        conv(torch.randn(2, 3, 4), initial_state=torch.randn(2, 4, 4))


def test_norms_match_definition():
    x, gate = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    norm, gated = RMSNorm(8, eps=1e-6), GatedRMSNorm(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(8))
        gated.weight.copy_(torch.randn(8))
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert rel_err(norm(x), expected * norm.weight) < 1e-6
    assert rel_err(gated(x, gate), expected * gated.weight * gate * torch.sigmoid(gate)) < 1e-6


def test_mlp_intermediate_size():
    # the paper's sizes: MoM-340M (ratio 3), GDN-340M (ratio 4), MoM-1.3B (ratio 4)
    assert mlp_intermediate_size(1024, 3) == 2048
    assert mlp_intermediate_size(1024, 4) == 2816
    assert mlp_intermediate_size(2048, 4) == 5632
    assert mlp_intermediate_size(1024, 4, intermediate_size=1000) == 1000


def test_make_linear_rejects_unknown_kind():
    assert make_linear(4, 3, kind="row").weight.shape == (3, 4)
    with pytest.raises(ValueError, match="kind"):
        make_linear(4, 3, kind="diagonal")


def test_rope_depends_on_relative_position():
    q, k = torch.randn(1, 1, 2, 16), torch.randn(1, 1, 2, 16)

    def score(m: int, n: int) -> torch.Tensor:
        qm = apply_rope(q, torch.tensor([[m]]), 10000.0)
        kn = apply_rope(k, torch.tensor([[n]]), 10000.0)
        return (qm * kn).sum(-1)

    assert rel_err(score(7, 3), score(104, 100)) < 1e-5
    assert rel_err(score(7, 3), score(3, 7)) > 1e-3
    assert rel_err(apply_rope(q, torch.tensor([[0]]), 10000.0), q) < 1e-7


def test_gated_deltanet_init_and_shapes():
    cfg = ModelConfig(arch="gated_deltanet", hidden_size=32, num_heads=2, head_dim=16, expand_v=2)
    layer = GatedDeltaNet(cfg)
    A = layer.A_log.exp()
    assert bool(((A >= 1) & (A <= 16)).all())
    dt = F.softplus(layer.dt_bias)
    assert bool(((dt >= 1e-4 * (1 - 1e-5)) & (dt <= 0.1 * (1 + 1e-5))).all())
    assert layer.A_log._no_weight_decay and layer.dt_bias._no_weight_decay
    bound = 2 ** -2.5 * math.sqrt(6 / (32 + 32))
    assert layer.q_proj.weight.abs().max() <= bound
    assert layer.v_proj.weight.shape == (64, 32) and layer.o_norm.weight.shape == (32,)
    y, cache, aux = layer(torch.randn(2, 5, 32), use_cache=True)
    assert y.shape == (2, 5, 32) and aux == {}
    assert cache.recurrent.shape == (2, 2, 16, 32) and cache.recurrent.dtype == torch.float32
    assert [c.shape for c in cache.conv] == [(2, 32, 3), (2, 32, 3), (2, 64, 3)]


def test_wide_value_split_equals_one_kernel_call():
    B, T, H, K, V = 2, 9, 2, 16, 2 * MAX_KERNEL_VALUE_DIM
    q, k = torch.randn(B, T, H, K), torch.randn(B, T, H, K)
    v = torch.randn(B, T, H, V)
    g, beta = -torch.rand(B, T, H), torch.rand(B, T, H)
    state = torch.randn(B, H, K, V)
    o, final = wide_value_gated_delta_rule(q, k, v, g, beta, state, True, None, "torch")
    ref_o, ref_final = naive_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=state,
                                                        output_final_state=True, use_qk_l2norm_in_kernel=True)
    assert rel_err(o, ref_o) < 1e-5
    assert rel_err(final, ref_final) < 1e-5
