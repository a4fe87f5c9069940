"""The chunked gated delta rule's passes run once in order, keeping every intermediate, for the scripts that
time or tune single passes (bench_kernels.py, tune_chunk_kernels.py)."""
from __future__ import annotations

import torch

from mom_train.kernels.gated_delta_rule.chunk_bwd import dh_bwd, dqkw_bwd, dv_local_bwd
from mom_train.kernels.gated_delta_rule.chunk_fwd import chunk_tables, h_fwd, prepare_fwd


def run_chunk_passes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                     do: torch.Tensor, cu: torch.Tensor, num_slots: int, scale: float) -> dict[str, torch.Tensor]:
    """q, k [TT, H, K], v and do [TT, H, V], g and beta [TT, H], cu int32 [N+1]; num_slots chunk slots.
    Returns the inputs of every pass up to the wy backward: coff, table, gamma, Ai, w, u, h, vnew, dvl, dh,
    dv2, dq, dka, dw, dgp."""
    coff, table = chunk_tables(cu, num_slots)
    gamma, Ai, w, u = prepare_fwd(k, v, g, beta, cu, table)
    h, vnew, _ = h_fwd(k, w, u, gamma, cu, coff, num_slots, None, False)
    dvl = dv_local_bwd(q, k, do, gamma, cu, table, scale)
    dh, dv2, _ = dh_bwd(q, k, w, do, dvl, gamma, cu, coff, num_slots, scale, None, False)
    dq, dka, dw, dgp = dqkw_bwd(q, k, vnew, h, dh, do, dv2, gamma, cu, table, scale)
    return dict(coff=coff, table=table, gamma=gamma, Ai=Ai, w=w, u=u, h=h, vnew=vnew, dvl=dvl, dh=dh, dv2=dv2,
                dq=dq, dka=dka, dw=dw, dgp=dgp)
