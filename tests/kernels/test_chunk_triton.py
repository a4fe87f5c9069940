"""Triton chunked gated delta rule on CPU (Triton interpreter) against the float64 definition.

The interpreter must be switched on before triton is first imported, and pytest may already have imported
it, so the kernel cases run in one child process (TRITON_INTERPRET=1) that prints their errors as JSON.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from tests.kernels.interpreter import run_in_interpreter

REPO = Path(__file__).resolve().parents[2]

# tiny shapes; lengths cover 1, 63, 64, 65, 130 and an empty segment
CASES = {
    "fixed_B2_T130": dict(B=2, T=130, H=2, K=16, V=32, h0=False, l2=False, final=True),
    "varlen_1_63_64_65_empty_130_h0_l2": dict(lengths=[1, 63, 64, 65, 0, 130], H=2, K=32, V=16, h0=True, l2=True,
                                              final=True),
    "fixed_T64_h0_nofinal_scale": dict(B=1, T=64, H=2, K=32, V=32, h0=True, l2=False, final=False, scale=0.3),
    # decays this steep push the in-chunk cumsum past fp32's exp range; partial last chunks pad with gamma 0
    "steep_decay_partial_chunks": dict(lengths=[55, 0, 70], H=2, K=16, V=16, h0=False, l2=True, final=True,
                                       g_scale=25.0),
    # half-precision operands, fp32 accumulation and states
    "fp16_varlen_65_1_h0_l2": dict(lengths=[65, 1], H=2, K=16, V=16, h0=True, l2=True, final=True,
                                   dtype="float16"),
}
FIELDS = ["o", "ht", "dq", "dk", "dv", "dg", "dbeta", "dinitial_state"]
# fp32 in the interpreter: errors are rounding only; fp16 operands: their rounding (~1e-3)
TOL = {"float32": 1e-4, "float16": 1e-2}


@pytest.fixture(scope="module")
def interpreter_errors() -> dict:
    return run_in_interpreter(__file__)


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_matches_definition(interpreter_errors: dict, case: str):
    errs = interpreter_errors[case]
    spec = CASES[case]
    expected = {"o", "dq", "dk", "dv", "dg", "dbeta"} | ({"ht"} if spec["final"] else set())
    expected |= {"dinitial_state"} if spec["h0"] else set()
    assert expected <= set(errs), f"missing outputs: {expected - set(errs)}"
    for name in FIELDS:
        if name in errs:
            assert errs[name] < TOL[spec.get("dtype", "float32")], f"{case}: {name} rel err {errs[name]:.2e} (NaN = unwritten or non-finite)"
    assert errs["dtypes_ok"] == 1.0, f"{case}: o or a gradient has the wrong dtype"


def test_rejects_bad_inputs():
    from mom_train.kernels.gated_delta_rule.chunk import chunk_gated_delta_rule
    q = torch.randn(2, 8, 2, 16)
    v = torch.randn(2, 8, 2, 16)
    g = torch.zeros(2, 8, 2)
    with pytest.raises(ValueError, match="batch size must be 1"):
        chunk_gated_delta_rule(q, q, v, g, g, cu_seqlens=torch.tensor([0, 8], dtype=torch.int32))
    with pytest.raises(ValueError, match="initial_state must be"):
        chunk_gated_delta_rule(q, q, v, g, g, initial_state=torch.zeros(1, 2, 16, 16))
    with pytest.raises(ValueError, match="head dims"):
        big = torch.randn(2, 8, 2, 512)
        chunk_gated_delta_rule(big, big, v, g, g)


def _main() -> None:
    # child process: the interpreter is on; run every case and print one JSON line
    sys.path.insert(0, str(REPO))
    from tests.kernels.gdr_check import compare, poison_buffers
    torch.set_num_threads(1)
    poison_buffers()
    out = {name: compare(spec, "cpu", getattr(torch, spec.get("dtype", "float32")), seed=i) for i, (name, spec) in enumerate(CASES.items())}
    print(json.dumps(out))


if __name__ == "__main__":
    _main()
