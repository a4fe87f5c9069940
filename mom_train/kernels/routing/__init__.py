"""Routing kernels of the MoM fast path: the memory-major stream plan and the permutations around it.

L tokens, top-k routing over E memories (plus one shared memory when `shared`), S = E (+1) streams,
N documents, F features, R = L*k (+L) buffer rows (memory-major, see stream_plan.py):

    build_stream_plan_triton(topk_idx [L, k], cu_seqlens [N+1], E, shared) -> StreamPlan
        src [R] long, dest [L, k] long, cu_seqlens [S*N + 1] int32; bit-exact with `build_stream_plan`, one
        Triton launch, no host sync. `build_stream_plan_auto` picks it for CUDA tensors.
    gather_tokens(x [L, F], row_token [R], dest [L, k], shared) -> [R, F]
        out[r] = x[row_token[r]]; backward dx[t] = sum of g over token t's rows (dest[t], L*k + t), fp32 sum.
    select_rows(table [M, F], src [R]) -> [R, F]
        out[r] = table[src[r]] (src unique); backward scatters g back, zeros in unselected rows.
    combine_rows(o [R, F], dest [L, k], weight [L, k] fp32, shared) -> y [L, F]
        y[t] = sum_j weight[t, j] * o[dest[t, j]] (+ o[L*k + t]), fp32 accumulation, o's dtype;
        backward do (each referenced row written once) and dweight[t, j] = <o[dest[t, j]], dy[t]> in fp32.

The permutations take `backend` "auto" (Triton for CUDA tensors, plain torch otherwise), "triton" or "torch";
neither backend uses atomics, so every gradient is deterministic. Importing this package needs no triton:
the kernels load on first use.
"""
from mom_train.kernels.routing.permute import combine_rows, gather_tokens, select_rows
from mom_train.kernels.routing.plan import build_stream_plan_auto, build_stream_plan_triton
from mom_train.kernels.routing.stream_plan import StreamPlan, build_stream_plan

__all__ = ["StreamPlan", "build_stream_plan", "build_stream_plan_auto", "build_stream_plan_triton", "combine_rows",
           "gather_tokens", "select_rows"]
