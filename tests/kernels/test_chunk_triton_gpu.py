"""Triton chunked gated delta rule on the GPU at real sizes, against the float64 definition run on the GPU.

Every output and gradient (q, k, v, g, beta, initial_state, and the final state) is compared by relative
error: fp32 < 1e-3, bf16 < 1e-2, never NaN; kernel buffers are NaN-poisoned first. Errors are printed.
"""
from __future__ import annotations

import pytest
import torch

from tests.kernels.gdr_check import compare, poison_buffers

CASES = {
    "B2_T2048_H4_K256": dict(B=2, T=2048, H=4, K=256, V=256, h0=True, l2=False, final=True),
    "varlen_1_63_empty_65_500_H16_K128_l2": dict(lengths=[1, 63, 0, 65, 500, 371], H=16, K=128, V=128, h0=True,
                                                 l2=True, final=True),
    "B1_T300_H2_K64_V128_nofinal": dict(B=1, T=300, H=2, K=64, V=128, h0=False, l2=False, final=False,
                                        scale=0.2),
    # in-chunk cumulative decays far past fp32's exp range, partial last chunks
    "steep_decay_varlen_55_0_70_H4_K256": dict(lengths=[55, 0, 70, 600], H=4, K=256, V=256, h0=False, l2=True,
                                               final=True, g_scale=25.0),
}
TOL = {torch.float32: 1e-3, torch.bfloat16: 1e-2}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_matches_definition_gpu(case: str, dtype: torch.dtype):
    poison_buffers()
    errs = compare(CASES[case], "cuda", dtype, seed=list(CASES).index(case))
    print(f"\n{case} {dtype}: " + " ".join(f"{k}={v:.2e}" for k, v in errs.items()))
    assert errs.pop("dtypes_ok") == 1.0, "o or a gradient has the wrong dtype"
    expected = {"o", "dq", "dk", "dv", "dg", "dbeta"}
    expected |= {"ht"} if CASES[case]["final"] else set()
    expected |= {"dinitial_state"} if CASES[case]["h0"] else set()
    assert expected <= set(errs)
    for name, err in errs.items():
        assert err < TOL[dtype], f"{name}: rel err {err:.2e} >= {TOL[dtype]} (NaN = unwritten or non-finite)"
