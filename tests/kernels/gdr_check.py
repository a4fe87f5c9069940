"""Shared checks for the Triton chunked gated delta rule: run it and a reference, return relative errors.

Every intermediate and output buffer the kernels allocate is filled with NaN first (`poison_buffers`), so an
element a kernel fails to write shows up as NaN in the result.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class _PoisonedTorch:
    """Stands in for the `torch` module inside the kernel wrappers: empty buffers come back NaN-filled."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs) -> torch.Tensor:
        out = torch.empty(*args, **kwargs)
        return out.fill_(math.nan) if out.is_floating_point() else out

    @staticmethod
    def empty_like(*args, **kwargs) -> torch.Tensor:
        out = torch.empty_like(*args, **kwargs)
        return out.fill_(math.nan) if out.is_floating_point() else out


def poison_buffers() -> None:
    """Make every torch.empty / empty_like in the chunk kernel wrappers return NaN-filled buffers."""
    from mom_train.kernels.gated_delta_rule import chunk, chunk_bwd, chunk_fwd, l2norm
    for module in (chunk, chunk_bwd, chunk_fwd, l2norm):
        module.torch = _PoisonedTorch()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def make_inputs(B: int, T: int, H: int, K: int, V: int, num_seqs: int, dtype: torch.dtype, device: str,
                with_h0: bool, l2: bool, generator: torch.Generator) -> dict:
    """Fresh random inputs: k unit-norm unless l2 (then raw), moderate decay, beta in (0, 1)."""
    def rand(*shape):
        return torch.randn(*shape, generator=generator, device="cpu").to(device)
    k = rand(B, T, H, K)
    if not l2:
        k = F.normalize(k, dim=-1)
    return dict(
        q=rand(B, T, H, K).to(dtype), k=k.to(dtype), v=rand(B, T, H, V).to(dtype),
        g=F.logsigmoid(rand(B, T, H) + 2.0).float(),
        beta=torch.rand(B, T, H, generator=generator).to(device).to(dtype),
        initial_state=rand(num_seqs, H, K, V) if with_h0 else None,
        do=rand(B, T, H, V).to(dtype), dht=rand(num_seqs, H, K, V))


def run_with_grads(fn, inputs: dict, cu: torch.Tensor | None, l2: bool, scale: float | None,
                   final: bool, upcast: torch.dtype | None = None) -> dict:
    """Run fn forward and backward; returns o, final state and the gradients of every tensor input."""
    names = ["q", "k", "v", "g", "beta"] + (["initial_state"] if inputs["initial_state"] is not None else [])
    leaves = {n: (inputs[n].to(upcast) if upcast else inputs[n]).detach().clone().requires_grad_() for n in names}
    o, ht = fn(leaves["q"], leaves["k"], leaves["v"], leaves["g"], leaves["beta"], scale=scale,
               initial_state=leaves.get("initial_state"), output_final_state=final, cu_seqlens=cu,
               use_qk_l2norm_in_kernel=l2)
    do = inputs["do"].to(o.dtype)
    loss = (o * do).sum()
    if final:
        loss = loss + (ht * inputs["dht"].to(ht.dtype)).sum()
    loss.backward()
    out = {"o": o.detach()}
    if final:
        out["ht"] = ht.detach()
    out.update({"d" + n: leaves[n].grad for n in names})
    return out


def reference_f64(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
                  use_qk_l2norm_in_kernel=False):
    """The definition of naive.py in float64 (naive.py itself computes in fp32)."""
    B, T, H, K = q.shape
    scale = K ** -0.5 if scale is None else scale
    q, k, v, g, beta = (x.double() for x in (q, k, v, g, beta))
    if use_qk_l2norm_in_kernel:
        q = q * torch.rsqrt(q.pow(2).sum(-1, keepdim=True) + 1e-6)
        k = k * torch.rsqrt(k.pow(2).sum(-1, keepdim=True) + 1e-6)
    if cu_seqlens is None:
        spans = [(b, 0, T) for b in range(B)]
    else:
        bounds = cu_seqlens.tolist()
        spans = [(0, bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]
    rows = [[None] * T for _ in range(B)]
    finals = []
    for n, (b, start, end) in enumerate(spans):
        state = initial_state[n].double() if initial_state is not None else q.new_zeros(H, K, v.shape[-1])
        for t in range(start, end):
            state = state * g[b, t].exp()[:, None, None]
            delta = (v[b, t] - torch.einsum("hkv,hk->hv", state, k[b, t])) * beta[b, t][:, None]
            state = state + k[b, t][:, :, None] * delta[:, None, :]
            rows[b][t] = torch.einsum("hkv,hk->hv", state, q[b, t]) * scale
        finals.append(state)
    o = torch.stack([torch.stack(r, 0) for r in rows], 0)
    return o, torch.stack(finals, 0) if output_final_state else None


def compare(case: dict, device: str, dtype: torch.dtype, seed: int) -> dict:
    """Relative errors of the Triton kernel against the float64 definition for one case, per output."""
    from mom_train.kernels.gated_delta_rule.chunk import chunk_gated_delta_rule
    gen = torch.Generator().manual_seed(seed)
    lengths = case.get("lengths")
    if lengths is not None:
        B, T = 1, sum(lengths)
        bounds = [0]
        for n in lengths:
            bounds.append(bounds[-1] + n)
        cu = torch.tensor(bounds, dtype=torch.int32, device=device)
        num_seqs = len(lengths)
    else:
        B, T, cu, num_seqs = case["B"], case["T"], None, case["B"]
    inputs = make_inputs(B, T, case["H"], case["K"], case["V"], num_seqs, dtype, device, case["h0"], case["l2"],
                         gen)
    # steep decay: in-chunk cumulative log decays far below -88, where exp of a padded row's gamma (0) minus a
    # valid one overflows unless masked
    inputs["g"] = inputs["g"] * case.get("g_scale", 1.0)
    scale = case.get("scale")
    ours = run_with_grads(chunk_gated_delta_rule, inputs, cu, case["l2"], scale, case["final"])
    ref = run_with_grads(reference_f64, inputs, cu, case["l2"], scale, case["final"], upcast=torch.float64)
    errs = {}
    for name, ref_val in ref.items():
        val = ours[name]
        errs[name] = math.nan if not torch.isfinite(val).all() else rel_err(val, ref_val)
    # o in v's dtype, every gradient in its input's dtype
    same = [ours["o"].dtype == inputs["v"].dtype]
    same += [ours[n].dtype == inputs[n[1:]].dtype for n in ours if n.startswith("d")]
    errs["dtypes_ok"] = float(all(same))
    return errs
