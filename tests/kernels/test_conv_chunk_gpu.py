"""GPU: the conv + chunked delta rule function at model sizes against the float64 definition, and the Gated
DeltaNet / MoM layers on their fused training path against the plain PyTorch path."""
from __future__ import annotations

import pytest
import torch

from mom_train.config import ModelConfig

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float("inf") if not torch.isfinite(a).all() else ((a - b).norm() / b.norm()).item()


def reference(q_in, k_in, v_in, weights, g, beta, cu, H, K):
    from mom_train.kernels.gated_delta_rule.chunk_torch import chunk_gated_delta_rule_torch
    from mom_train.kernels.short_conv.naive import naive_short_conv

    q, k, v = (naive_short_conv(x[None], w, cu)[0][0] for x, w in zip((q_in, k_in, v_in), weights))
    L = q.shape[0]
    o, _ = chunk_gated_delta_rule_torch(q.view(1, L, H, K), k.view(1, L, H, K), v.view(1, L, H, -1), g[None],
                                        beta[None], cu_seqlens=cu, use_qk_l2norm_in_kernel=True)
    return o[0]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("V", [256, 512])
def test_conv_chunk_matches_definition(dtype, tol, V):
    from mom_train.kernels.gated_delta_rule.conv_chunk import conv_chunk_gated_delta_rule

    torch.manual_seed(V)
    H, K = 4, 256
    lengths = [1, 63, 0, 65, 500, 1419]
    L = sum(lengths)
    cu = torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32)
    base = torch.randn(L, 2 * H * K + H * V + 8, device="cuda").to(dtype)
    inputs = list(base.split([H * K, H * K, H * V, 8], 1)[:3])
    weights = [torch.randn(x.shape[1], 4, device="cuda") * 0.5 for x in inputs]
    g = torch.nn.functional.logsigmoid(torch.randn(L, H, device="cuda") + 2.0)
    beta = torch.rand(L, H, device="cuda").to(dtype)
    do = torch.randn(L, H, V, device="cuda").to(dtype)
    leaves = [x.detach().clone().requires_grad_() for x in inputs + weights + [g, beta]]
    o = conv_chunk_gated_delta_rule(*leaves[:3], tuple(leaves[3:6]), leaves[6], leaves[7], cu, K)
    grads = torch.autograd.grad((o.float() * do.float()).sum(), leaves)
    ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
    ref_o = reference(*ref_leaves[:3], ref_leaves[3:6], ref_leaves[6], ref_leaves[7], cu, H, K)
    ref_grads = torch.autograd.grad((ref_o * do.double()).sum(), ref_leaves)
    errs = {"o": rel(o, ref_o)}
    names = ["dq_in", "dk_in", "dv_in", "dw_q", "dw_k", "dw_v", "dg", "dbeta"]
    errs.update({n: rel(a, b) for n, a, b in zip(names, grads, ref_grads)})
    bad = {k: v for k, v in errs.items() if not v < tol}
    assert not bad, f"relative errors above {tol}: {bad}"


@pytest.mark.parametrize("arch", ["gated_deltanet", "mom"])
def test_layer_fused_training_path_matches_torch_path(arch):
    from mom_train.model.gated_deltanet import GatedDeltaNet
    from mom_train.model.mom import MoMAttention

    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, hidden_size=256, num_heads=2, head_dim=128, expand_v=2.0 if arch != "mom" else 1.0,
                      kernel_backend="triton")
    layer = (MoMAttention if arch == "mom" else GatedDeltaNet)(cfg).cuda()
    bounds = [0, 100, 100, 101, 300, 517]
    x = torch.randn(1, bounds[-1], 256, device="cuda")
    cu = torch.tensor(bounds, dtype=torch.int32, device="cuda")
    probe = torch.randn_like(x)
    results = {}
    for backend in ("triton", "torch"):
        layer.kernel_backend = backend
        for conv in (layer.q_conv1d, layer.k_conv1d, layer.v_conv1d):
            conv.backend = backend
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        y = layer(xi, cu)[0]
        (y * probe).sum().backward()
        results[backend] = (y.detach(), xi.grad, {n: p.grad.clone() for n, p in layer.named_parameters()
                                                  if p.grad is not None})
    (y, dx, grads), (y_ref, dx_ref, grads_ref) = results["triton"], results["torch"]
    assert rel(y, y_ref) < 1e-4 and rel(dx, dx_ref) < 1e-4
    assert grads.keys() == grads_ref.keys()
    for name in grads_ref:
        assert rel(grads[name], grads_ref[name]) < 1e-3, name
