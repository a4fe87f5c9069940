"""fused_recurrent_gated_delta_rule (Triton) against the naive fp32 definition.

On a GPU the kernel runs compiled, in this process. Without one it runs in the Triton interpreter, in a spawned
worker process: TRITON_INTERPRET=1 must be set before triton itself is first imported, which this process may
already have done.
"""
import importlib
import multiprocessing

import pytest
import torch
import torch.nn.functional as F

from mom_train.kernels import gated_delta_rule, naive_recurrent_gated_delta_rule

dispatcher_module = importlib.import_module("mom_train.kernels.gated_delta_rule")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNEL = "mom_train.kernels.gated_delta_rule.fused_recurrent:fused_recurrent_gated_delta_rule"
DISPATCHER = "mom_train.kernels:gated_delta_rule"
H, K, V = 2, 16, 24
TOL = 1e-5

# (batch, total tokens, cu_seqlens or None)
SHAPES = {
    "T1": (2, 1, None),
    "B2-T9": (2, 9, None),
    "T63": (1, 63, None),
    "T64": (1, 64, None),
    "T65": (1, 65, None),
    "T200": (1, 200, None),
    # empty and length-1 segments: one decoding step for several sequences
    "decode-docs": (1, 3, [0, 1, 1, 2, 3]),
    "docs-empty-len1": (1, 30, [0, 0, 1, 9, 9, 10, 30]),
}
# (initial state, in-kernel l2norm, scale)
FLAGS = {
    "no-h0-unit-keys-scale-default": (False, False, None),
    "h0-l2norm-in-kernel-scale-0.3": (True, True, 0.3),
    "h0-unit-keys-scale-default": (True, False, None),
    "no-h0-l2norm-in-kernel-scale-0.3": (False, True, 0.3),
}
# the interpreter is slow: long inputs get the first two flag sets, short ones all four
CASES = [(shape, flags) for shape in SHAPES for i, flags in enumerate(FLAGS) if i < 2 or SHAPES[shape][1] < 40]


def _call(target: str, args: tuple, kwargs: dict) -> tuple:
    """Run target ("module:function") without autograd; returns (o, final, initial_state after, final is it)."""
    module, name = target.split(":")
    fn = getattr(importlib.import_module(module), name)
    with torch.no_grad():
        o, final = fn(*args, **kwargs)
    state = kwargs.get("initial_state")
    return o, final, state, final is not None and final is state


@pytest.fixture(scope="module")
def call():
    """call(target, *args, **kwargs), run where Triton can run: here on a GPU, else in an interpreter worker."""
    if DEVICE == "cuda":
        yield lambda target, *args, **kwargs: _call(target, args, kwargs)
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        pool = multiprocessing.get_context("spawn").Pool(1)
    try:
        yield lambda target, *args, **kwargs: pool.apply(_call, (target, args, kwargs))
    finally:
        pool.close()
        pool.join()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def make_inputs(batch, num_tokens, cu_seqlens, use_initial_state, l2norm_in_kernel, dtype=torch.float32,
                head_dims=(H, K, V)):
    """Fresh seeded inputs on DEVICE: log decays, beta in (0, 1), unit keys unless the kernel normalises them."""
    heads, dk, dv = head_dims
    q = torch.randn(batch, num_tokens, heads, dk)
    k = torch.randn(batch, num_tokens, heads, dk)
    if not l2norm_in_kernel:
        k = F.normalize(k, dim=-1)
    v = torch.randn(batch, num_tokens, heads, dv)
    g = F.logsigmoid(torch.randn(batch, num_tokens, heads))
    beta = torch.rand(batch, num_tokens, heads)
    cu = None if cu_seqlens is None else torch.tensor(cu_seqlens, dtype=torch.int32, device=DEVICE)
    num_seqs = batch if cu is None else len(cu_seqlens) - 1
    h0 = torch.randn(num_seqs, heads, dk, dv, device=DEVICE) if use_initial_state else None
    q, k, v, beta = (x.to(DEVICE, dtype) for x in (q, k, v, beta))
    return (q, k, v, g.to(DEVICE), beta), h0, cu


@pytest.mark.parametrize("shape,flags", CASES, ids=[f"{shape}-{flags}" for shape, flags in CASES])
def test_matches_naive(call, shape, flags):
    batch, num_tokens, cu_seqlens = SHAPES[shape]
    use_initial_state, l2norm_in_kernel, scale = FLAGS[flags]
    inputs, h0, cu = make_inputs(batch, num_tokens, cu_seqlens, use_initial_state, l2norm_in_kernel)
    kwargs = dict(scale=scale, initial_state=h0, output_final_state=True, cu_seqlens=cu,
                  use_qk_l2norm_in_kernel=l2norm_in_kernel)
    o, final, _, _ = call(KERNEL, *inputs, **kwargs)
    o_ref, final_ref = naive_recurrent_gated_delta_rule(*inputs, **kwargs)
    assert o.shape == o_ref.shape and o.dtype == o_ref.dtype and final.dtype == torch.float32
    assert rel_err(o, o_ref) < TOL, f"o: relative error {rel_err(o, o_ref):.2e}"
    assert rel_err(final, final_ref) < TOL, f"final state: relative error {rel_err(final, final_ref):.2e}"


@pytest.mark.parametrize("shape", ["T1", "decode-docs"])
def test_inplace_final_state(call, shape):
    batch, num_tokens, cu_seqlens = SHAPES[shape]
    inputs, h0, cu = make_inputs(batch, num_tokens, cu_seqlens, True, True)
    o_ref, final_ref = naive_recurrent_gated_delta_rule(*inputs, initial_state=h0, output_final_state=True,
                                                        cu_seqlens=cu, use_qk_l2norm_in_kernel=True)
    o, final, state, same_object = call(KERNEL, *inputs, initial_state=h0.clone(), cu_seqlens=cu,
                                        use_qk_l2norm_in_kernel=True, inplace_final_state=True)
    assert same_object, "the final state must be the initial_state tensor itself"
    assert rel_err(o, o_ref) < TOL and rel_err(state, final_ref) < TOL


def test_inplace_needs_initial_state(call):
    inputs, _, _ = make_inputs(1, 1, None, False, False)
    with pytest.raises(ValueError, match="inplace_final_state=True"):
        call(KERNEL, *inputs, inplace_final_state=True)


def test_low_precision_output(call):
    inputs, h0, cu = make_inputs(1, 5, [0, 2, 5], True, True, dtype=torch.bfloat16)
    kwargs = dict(initial_state=h0, output_final_state=True, cu_seqlens=cu, use_qk_l2norm_in_kernel=True)
    o, final, _, _ = call(KERNEL, *inputs, **kwargs)
    o_ref, final_ref = naive_recurrent_gated_delta_rule(*inputs, **kwargs)
    assert o.dtype == torch.bfloat16 and final.dtype == torch.float32
    assert rel_err(o, o_ref) < 1e-2 and rel_err(final, final_ref) < TOL


def test_dispatcher_triton_backend(call):
    inputs, h0, cu = make_inputs(1, 3, [0, 1, 1, 2, 3], True, True)
    kwargs = dict(initial_state=h0, output_final_state=True, cu_seqlens=cu, use_qk_l2norm_in_kernel=True)
    o, final, _, _ = call(DISPATCHER, *inputs, backend="triton", **kwargs)
    o_ref, final_ref = naive_recurrent_gated_delta_rule(*inputs, **kwargs)
    assert rel_err(o, o_ref) < TOL and rel_err(final, final_ref) < TOL


@pytest.mark.parametrize("num_tokens,needs_grad,expected", [(3, False, "fused"), (64, False, "fused"),
                                                            (65, False, "chunk"), (3, True, "chunk")],
                         ids=["T3-inference", "T64-inference", "T65-inference", "T3-training"])
def test_dispatcher_routing(monkeypatch, num_tokens, needs_grad, expected):
    # which triton kernel the dispatcher picks; the kernels themselves are replaced by recorders
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls = []
    for name, tag in (("fused_recurrent_gated_delta_rule", "fused"), ("chunk_gated_delta_rule", "chunk")):
        monkeypatch.setattr(dispatcher_module, name, lambda *args, tag=tag, **kwargs: calls.append(tag) or (None, None))
    inputs, h0, _ = make_inputs(1, num_tokens, None, True, False)
    h0.requires_grad_(needs_grad)
    gated_delta_rule(*inputs, initial_state=h0, backend="triton")
    assert calls == [expected]


@pytest.mark.gpu
@pytest.mark.parametrize("head_dims", [(4, 256, 256), (16, 128, 128), (4, 64, 128)], ids=["256", "128", "64x128"])
def test_real_sizes_on_gpu(call, head_dims):
    inputs, h0, cu = make_inputs(1, 40, [0, 1, 1, 9, 40], True, True, dtype=torch.bfloat16, head_dims=head_dims)
    kwargs = dict(initial_state=h0, output_final_state=True, cu_seqlens=cu, use_qk_l2norm_in_kernel=True)
    o, final, _, _ = call(KERNEL, *inputs, **kwargs)
    o_ref, final_ref = naive_recurrent_gated_delta_rule(*inputs, **kwargs)
    assert rel_err(o, o_ref) < 1e-2 and rel_err(final, final_ref) < 1e-4
