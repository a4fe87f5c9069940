"""One rank's context-parallel delta-rule work without collectives: the pass from zero states and the pass from
the identity (`handing_on_passes`) plus the incoming state's share stand for one pass from the state that
enters, and the summary (M, S_0) carries that state to the rank's end; scripts/bench_cp_rank.py times this."""
from __future__ import annotations

import pytest
import torch

from mom_train.kernels.gated_delta_rule import gated_delta_rule
from tests.scripts import load_script


def load_bench():
    return load_script("bench_cp_rank")


@pytest.mark.parametrize("tokens", [1, 63, 65, 130])
def test_two_passes_stand_for_one_pass_from_the_incoming_state(tokens):
    bench = load_bench()
    x = bench.make_inputs(tokens, 2, 16, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        o, summary = bench.middle_rank(x, "torch")  # handing_on_passes, then the incoming state's share
        ref, final = gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x["state_in"],
                                      output_final_state=True, cu_seqlens=x["cu"], backend="torch")
    assert ((o - ref).norm() / ref.norm()).item() < 1e-5
    m, s0 = summary[..., :16], summary[..., 16:]
    # the state handed on is affine in the state that entered: S_out = M S_in + S_0, as compose_prefix composes it
    handed_on = m @ x["state_in"] + s0
    assert ((handed_on - final).norm() / final.norm()).item() < 1e-5


def test_bench_runs_and_checks_on_cpu():
    result = load_bench().main(["--device", "cpu", "--tokens", "70", "--heads", "2", "--head-dim", "16",
                                "--dtype", "fp32", "--backend", "torch", "--reps", "1"])
    assert result["check_rel_err"] < 1e-5
    assert result["ratio_fwd"] > 0 and result["ratio_fwd_bwd"] > 0
