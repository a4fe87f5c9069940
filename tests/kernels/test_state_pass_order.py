"""The state passes (h_fwd, dh_bwd) give the same results with their sequences launched in reverse grid order.

REVERSE_SEQS only changes which program handles which sequence (the launch the Hopper settings use); every
output must be bit-identical to the plain order: states per chunk, V_new / dU, and the final / initial-state
gradients. Runs in the Triton interpreter (child process), over packed lengths with empty and 1-token
segments and an initial state.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from tests.kernels.interpreter import run_in_interpreter

REPO = Path(__file__).resolve().parents[2]
LENGTHS = [70, 0, 1, 130, 65]


def test_reversed_sequence_order_is_identical():
    same = run_in_interpreter(__file__)
    assert same == {"h_fwd": [True, True, True], "dh_bwd": [True, True, True]}


def _main() -> None:
    sys.path.insert(0, str(REPO))
    import torch.nn.functional as F
    import triton

    from mom_train.kernels.gated_delta_rule.chunk_bwd import dh_bwd, dv_local_bwd
    from mom_train.kernels.gated_delta_rule.chunk_fwd import BT, chunk_tables, h_fwd, prepare_fwd, seq_config

    torch.manual_seed(0)
    TT, H, K, V, N = sum(LENGTHS), 2, 32, 32, len(LENGTHS)
    cu = torch.tensor([0] + LENGTHS).cumsum(0).to(torch.int32)
    num_slots = triton.cdiv(TT, BT) + N
    coff, table = chunk_tables(cu, num_slots)
    q, k = (F.normalize(torch.randn(TT, H, K), dim=-1) for _ in range(2))
    v, do = torch.randn(TT, H, V), torch.randn(TT, H, V)
    g, beta = F.logsigmoid(torch.randn(TT, H) + 3), torch.rand(TT, H)
    h0, dht = torch.randn(N, H, K, V), torch.randn(N, H, K, V)
    gamma, _, w, u = prepare_fwd(k, v, g, beta, cu, table)
    dvl = dv_local_bwd(q, k, do, gamma, cu, table, 0.3)
    used = table[:, 1] >= 0
    base = seq_config(K, V, torch.float32, backward=False)

    def run(pass_fn, reverse: bool) -> list[torch.Tensor]:
        states, rows, boundary = pass_fn(dict(base, REVERSE_SEQS=reverse))
        # chunk slots past the last chunk are never written
        return [states[used], rows, boundary]

    passes = {
        "h_fwd": lambda cfg: h_fwd(k, w, u, gamma, cu, coff, num_slots, h0, True, config=cfg),
        "dh_bwd": lambda cfg: dh_bwd(q, k, w, do, dvl, gamma, cu, coff, num_slots, 0.3, dht, True, config=cfg),
    }
    out = {name: [torch.equal(a, b) for a, b in zip(run(fn, False), run(fn, True))] for name, fn in passes.items()}
    print(json.dumps(out))


if __name__ == "__main__":
    _main()
