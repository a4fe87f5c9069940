"""chunk_gated_delta_rule_torch and the gated_delta_rule dispatcher against the naive fp32 definition."""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from mom_train.kernels import chunk_gated_delta_rule_torch, gated_delta_rule, naive_recurrent_gated_delta_rule

H, K, V = 2, 16, 12
TOL = 1e-4

# (batch, total tokens, cu_seqlens or None)
SHAPES = {
    "T1": (2, 1, None),
    "T63": (2, 63, None),
    "T64": (1, 64, None),
    "T65": (2, 65, None),
    "T200": (2, 200, None),
    # empty and length-1 segments, a segment of exactly one chunk, and segments crossing chunk edges
    "docs-empty-len1": (1, 131, [0, 0, 1, 65, 65, 66, 131]),
    "docs-long": (1, 200, [0, 63, 127, 128, 200, 200]),
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def make_inputs(batch, num_tokens, cu_seqlens, use_initial_state, l2norm_in_kernel, dtype=torch.float32):
    """Fresh seeded inputs: log decays, beta in (0, 1), unit keys unless the kernel normalises them."""
    q = torch.randn(batch, num_tokens, H, K, dtype=dtype)
    k = torch.randn(batch, num_tokens, H, K, dtype=dtype)
    if not l2norm_in_kernel:
        k = F.normalize(k.float(), dim=-1).to(dtype)
    v = torch.randn(batch, num_tokens, H, V, dtype=dtype)
    g = F.logsigmoid(torch.randn(batch, num_tokens, H))
    beta = torch.rand(batch, num_tokens, H).to(dtype)
    cu = None if cu_seqlens is None else torch.tensor(cu_seqlens, dtype=torch.int32)
    num_seqs = batch if cu is None else len(cu_seqlens) - 1
    h0 = torch.randn(num_seqs, H, K, V) if use_initial_state else None
    return (q, k, v, g, beta), h0, cu


def run_with_grads(fn, inputs, h0, cu, scale, l2norm_in_kernel, do, dh):
    """Output, final state and the gradients of <o, do> + <final, dh> for every input."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    h0_leaf = None if h0 is None else h0.detach().clone().requires_grad_()
    o, final = fn(*leaves, scale=scale, initial_state=h0_leaf, output_final_state=True, cu_seqlens=cu,
                  use_qk_l2norm_in_kernel=l2norm_in_kernel)
    wrt = leaves + ([] if h0_leaf is None else [h0_leaf])
    grads = torch.autograd.grad((o.float() * do).sum() + (final * dh).sum(), wrt)
    return o, final, grads


@pytest.mark.parametrize("scale", [None, 0.3], ids=["scale-default", "scale-0.3"])
@pytest.mark.parametrize("l2norm_in_kernel", [False, True], ids=["unit-keys", "l2norm-in-kernel"])
@pytest.mark.parametrize("use_initial_state", [False, True], ids=["no-h0", "h0"])
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_matches_naive(shape, use_initial_state, l2norm_in_kernel, scale):
    batch, num_tokens, cu_seqlens = SHAPES[shape]
    inputs, h0, cu = make_inputs(batch, num_tokens, cu_seqlens, use_initial_state, l2norm_in_kernel)
    num_seqs = batch if cu is None else cu.numel() - 1
    do = torch.randn(batch, num_tokens, H, V)
    dh = torch.randn(num_seqs, H, K, V)
    ref = run_with_grads(naive_recurrent_gated_delta_rule, inputs, h0, cu, scale, l2norm_in_kernel, do, dh)
    out = run_with_grads(chunk_gated_delta_rule_torch, inputs, h0, cu, scale, l2norm_in_kernel, do, dh)
    names = ["o", "final_state", "dq", "dk", "dv", "dg", "dbeta", "dh0"]
    for name, a, b in zip(names, [out[0], out[1], *out[2]], [ref[0], ref[1], *ref[2]]):
        assert a.shape == b.shape, name
        assert rel_err(a, b) < TOL, f"{name}: relative error {rel_err(a, b):.2e}"


@pytest.mark.parametrize("shape", ["T65", "docs-empty-len1"])
def test_gradient_through_final_state_only(shape):
    batch, num_tokens, cu_seqlens = SHAPES[shape]
    inputs, h0, cu = make_inputs(batch, num_tokens, cu_seqlens, True, False)
    do = torch.zeros(batch, num_tokens, H, V)
    dh = torch.randn(h0.shape)
    ref = run_with_grads(naive_recurrent_gated_delta_rule, inputs, h0, cu, None, False, do, dh)
    out = run_with_grads(chunk_gated_delta_rule_torch, inputs, h0, cu, None, False, do, dh)
    for i, (a, b) in enumerate(zip(out[2], ref[2])):
        assert rel_err(a, b) < TOL, f"gradient {i}: relative error {rel_err(a, b):.2e}"


def test_empty_segment_keeps_initial_state():
    inputs, h0, cu = make_inputs(1, 5, [0, 0, 5, 5], True, False)
    o, final = chunk_gated_delta_rule_torch(*inputs, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    assert torch.equal(final[0], h0[0]) and torch.equal(final[2], h0[2])
    assert rel_err(final[1], h0[1]) > 1e-3


def test_low_precision_inputs_give_fp32_states():
    inputs, h0, cu = make_inputs(2, 70, None, True, True, dtype=torch.bfloat16)
    o, final = chunk_gated_delta_rule_torch(*inputs, initial_state=h0, output_final_state=True)
    o_ref, final_ref = naive_recurrent_gated_delta_rule(*inputs, initial_state=h0, output_final_state=True)
    assert o.dtype == torch.bfloat16 and final.dtype == torch.float32
    assert rel_err(o, o_ref) < 1e-2 and rel_err(final, final_ref) < 1e-4


def test_packed_equals_batched():
    inputs, h0, _ = make_inputs(3, 70, None, True, False)
    o, final = chunk_gated_delta_rule_torch(*inputs, initial_state=h0, output_final_state=True)
    packed = [x.reshape(1, 3 * 70, *x.shape[2:]) for x in inputs]
    cu = torch.tensor([0, 70, 140, 210], dtype=torch.int32)
    o_packed, final_packed = chunk_gated_delta_rule_torch(*packed, initial_state=h0, output_final_state=True,
                                                          cu_seqlens=cu)
    assert rel_err(o_packed.view_as(o), o) < 1e-5 and rel_err(final_packed, final) < 1e-5


def test_bad_inputs_name_the_problem():
    inputs, h0, cu = make_inputs(2, 8, None, True, False)
    q, k, v, g, beta = inputs
    with pytest.raises(ValueError, match="g must be"):
        chunk_gated_delta_rule_torch(q, k, v, g[..., None], beta)
    with pytest.raises(ValueError, match="initial_state must be"):
        chunk_gated_delta_rule_torch(q, k, v, g, beta, initial_state=h0[:1])
    with pytest.raises(ValueError, match="batch size 1"):
        chunk_gated_delta_rule_torch(q, k, v, g, beta, cu_seqlens=torch.tensor([0, 8], dtype=torch.int32))


def test_dispatcher_backends_on_cpu(monkeypatch):
    inputs, h0, cu = make_inputs(1, 40, [0, 17, 40], True, True)
    kwargs = dict(initial_state=h0, output_final_state=True, cu_seqlens=cu, use_qk_l2norm_in_kernel=True)
    o_ref, final_ref = chunk_gated_delta_rule_torch(*inputs, **kwargs)
    for backend in ("auto", "torch"):
        o, final = gated_delta_rule(*inputs, backend=backend, **kwargs)
        assert torch.equal(o, o_ref) and torch.equal(final, final_ref)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        gated_delta_rule(*inputs, backend="triton", **kwargs)
    with pytest.raises(ValueError, match="backend must be one of"):
        gated_delta_rule(*inputs, backend="cuda", **kwargs)


def test_import_needs_no_triton():
    code = "import sys, mom_train.kernels; assert 'triton' not in sys.modules, 'triton was imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
