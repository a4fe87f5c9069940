"""Forward Triton kernels of the chunked gated delta rule (chunk 64, WY form). README.md derives them.

Layout: every token tensor is flattened to one packed stream, q/k [TT, H, K], v [TT, H, V], g/beta [TT, H]
(TT = B * T), with sequence bounds cu [N+1] and a chunk table [NC, 2] = (sequence, first token) built on the
device (first token -1 for unused slots, whose programs exit at once). Per-chunk states h are [NC, H, K, V].
All offsets are int64; only plain pointer arithmetic is used.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# chunk length
BT = 64


@triton.jit
def _chunk_header(table, cu, i_c):
    """(sequence, first token, end token) of chunk slot i_c; first token < 0 marks an unused slot."""
    i_n = tl.load(table + i_c * 2).to(tl.int64)
    bos = tl.load(table + i_c * 2 + 1).to(tl.int64)
    eos = tl.load(cu + i_n + 1).to(tl.int64)
    return i_n, bos, eos


@triton.jit
def _chunk_table_kernel(cu, coff, table, N, NC, LOG_N: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr):
    """One program. coff[n] = sum_{m<n} cdiv(len_m, 64); then for each chunk slot c a binary search for the
    last sequence n with coff[n] <= c gives table[c] = (n, cu[n] + 64 (c - coff[n])), or (n, -1) past the end."""
    carry = tl.sum(tl.zeros([BN], dtype=tl.int32), 0)
    tl.store(coff, carry)
    for i0 in range(0, N, BN):
        o = i0 + tl.arange(0, BN)
        m = o < N
        b_lo = tl.load(cu + o, mask=m, other=0)
        b_hi = tl.load(cu + o + 1, mask=m, other=0)
        b_num = tl.where(m, (b_hi - b_lo + 63) // 64, 0)
        tl.store(coff + o + 1, carry + tl.cumsum(b_num, 0), mask=m)
        carry += tl.sum(b_num, 0)
    tl.debug_barrier()
    for c0 in range(0, NC, BC):
        c = c0 + tl.arange(0, BC)
        b_lo = tl.zeros([BC], dtype=tl.int32)
        b_hi = tl.zeros([BC], dtype=tl.int32) + (N - 1)
        for _ in range(LOG_N):
            b_mid = (b_lo + b_hi + 1) // 2
            b_go = tl.load(coff + b_mid) <= c
            b_lo = tl.where(b_go, b_mid, b_lo)
            b_hi = tl.where(b_go, b_hi, b_mid - 1)
        b_start = tl.load(cu + b_lo) + (c - tl.load(coff + b_lo)) * 64
        b_start = tl.where(c < carry, b_start, -1)
        m = c < NC
        tl.store(table + c.to(tl.int64) * 2, b_lo, mask=m)
        tl.store(table + c.to(tl.int64) * 2 + 1, b_start, mask=m)


@triton.jit
def _kkt_body(k, g, beta, gamma, A, bos, eos, i_h, H: tl.constexpr, K: tl.constexpr, BK: tl.constexpr,
              DOT_PREC: tl.constexpr):
    """gamma = in-chunk cumsum of g; A[i, j] = beta_i k_i.k_j exp(gamma_i - gamma_j) for i > j, else 0."""
    r = tl.arange(0, 64)
    t = bos + r
    m_t = t < eos
    b_g = tl.load(g + t * H + i_h, mask=m_t, other=0.).to(tl.float32)
    b_gam = tl.cumsum(b_g, axis=0)
    tl.store(gamma + t * H + i_h, b_gam, mask=m_t)
    b_beta = tl.load(beta + t * H + i_h, mask=m_t, other=0.).to(tl.float32)
    b_kk = tl.zeros([64, 64], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_k = tl.load(k + (t * H + i_h)[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.)
        b_kt = tl.load(k + (t * H + i_h)[None, :] * K + o_k[:, None], mask=m_k[:, None] & m_t[None, :], other=0.)
        b_kk += tl.dot(b_k, b_kt, input_precision=DOT_PREC)
    # valid rows only: a padded row's gamma (0) minus a valid one could overflow exp
    m_lo = (r[:, None] > r[None, :]) & m_t[:, None]
    b_decay = tl.exp(tl.where(m_lo, b_gam[:, None] - b_gam[None, :], 0.))
    b_a = tl.where(m_lo, b_kk * b_decay * b_beta[:, None], 0.)
    tl.store(A + (t * H + i_h)[:, None] * 64 + r[None, :], b_a, mask=m_t[:, None])


@triton.jit
def _load_blk(A, bos, eos, i_h, H: tl.constexpr, I: tl.constexpr, J: tl.constexpr):
    """Block (I, J) [16, 16] of a chunk's [64, 64] matrix stored row-major per token, fp32, zero past eos."""
    r = tl.arange(0, 16)
    t = bos + I * 16 + r
    return tl.load(A + (t * H + i_h)[:, None] * 64 + J * 16 + r[None, :], mask=(t < eos)[:, None], other=0.)


@triton.jit
def _store_blk(Ai, b, bos, eos, i_h, H: tl.constexpr, I: tl.constexpr, J: tl.constexpr):
    r = tl.arange(0, 16)
    t = bos + I * 16 + r
    tl.store(Ai + (t * H + i_h)[:, None] * 64 + J * 16 + r[None, :], b, mask=(t < eos)[:, None])


@triton.jit
def _inv_unit_lower16(b_a):
    """(I + A)^-1 of a strictly lower [16, 16] A by forward substitution: x_i = e_i - sum_{j<i} a_ij x_j."""
    r = tl.arange(0, 16)
    b_x = tl.where(r[:, None] == r[None, :], 1., 0.)
    for i in range(1, 16):
        b_ai = tl.sum(tl.where(r[:, None] == i, b_a, 0.), 0)
        b_xi = tl.sum(b_ai[:, None] * b_x, 0)
        b_ei = tl.where(r == i, 1., 0.)
        b_x = tl.where(r[:, None] == i, (b_ei - b_xi)[None, :], b_x)
    return b_x


@triton.jit
def _solve_body(A, Ai, bos, eos, i_h, H: tl.constexpr):
    """Ai = (I + A)^-1 per chunk: four 16x16 diagonal inverses, then T_ij = -T_ii sum_{j<=m<i} A_im T_mj."""
    a21 = _load_blk(A, bos, eos, i_h, H, 1, 0)
    a31 = _load_blk(A, bos, eos, i_h, H, 2, 0)
    a32 = _load_blk(A, bos, eos, i_h, H, 2, 1)
    a41 = _load_blk(A, bos, eos, i_h, H, 3, 0)
    a42 = _load_blk(A, bos, eos, i_h, H, 3, 1)
    a43 = _load_blk(A, bos, eos, i_h, H, 3, 2)
    t11 = _inv_unit_lower16(_load_blk(A, bos, eos, i_h, H, 0, 0))
    t22 = _inv_unit_lower16(_load_blk(A, bos, eos, i_h, H, 1, 1))
    t33 = _inv_unit_lower16(_load_blk(A, bos, eos, i_h, H, 2, 2))
    t44 = _inv_unit_lower16(_load_blk(A, bos, eos, i_h, H, 3, 3))
    t21 = -tl.dot(t22, tl.dot(a21, t11, input_precision="ieee"), input_precision="ieee")
    t32 = -tl.dot(t33, tl.dot(a32, t22, input_precision="ieee"), input_precision="ieee")
    t43 = -tl.dot(t44, tl.dot(a43, t33, input_precision="ieee"), input_precision="ieee")
    s31 = tl.dot(a31, t11, input_precision="ieee") + tl.dot(a32, t21, input_precision="ieee")
    t31 = -tl.dot(t33, s31, input_precision="ieee")
    s42 = tl.dot(a42, t22, input_precision="ieee") + tl.dot(a43, t32, input_precision="ieee")
    t42 = -tl.dot(t44, s42, input_precision="ieee")
    s41 = (tl.dot(a41, t11, input_precision="ieee") + tl.dot(a42, t21, input_precision="ieee")
           + tl.dot(a43, t31, input_precision="ieee"))
    t41 = -tl.dot(t44, s41, input_precision="ieee")
    b_zero = tl.zeros([16, 16], dtype=tl.float32)
    _store_blk(Ai, t11, bos, eos, i_h, H, 0, 0)
    _store_blk(Ai, b_zero, bos, eos, i_h, H, 0, 1)
    _store_blk(Ai, b_zero, bos, eos, i_h, H, 0, 2)
    _store_blk(Ai, b_zero, bos, eos, i_h, H, 0, 3)
    _store_blk(Ai, t21, bos, eos, i_h, H, 1, 0)
    _store_blk(Ai, t22, bos, eos, i_h, H, 1, 1)
    _store_blk(Ai, b_zero, bos, eos, i_h, H, 1, 2)
    _store_blk(Ai, b_zero, bos, eos, i_h, H, 1, 3)
    _store_blk(Ai, t31, bos, eos, i_h, H, 2, 0)
    _store_blk(Ai, t32, bos, eos, i_h, H, 2, 1)
    _store_blk(Ai, t33, bos, eos, i_h, H, 2, 2)
    _store_blk(Ai, b_zero, bos, eos, i_h, H, 2, 3)
    _store_blk(Ai, t41, bos, eos, i_h, H, 3, 0)
    _store_blk(Ai, t42, bos, eos, i_h, H, 3, 1)
    _store_blk(Ai, t43, bos, eos, i_h, H, 3, 2)
    _store_blk(Ai, t44, bos, eos, i_h, H, 3, 3)


@triton.jit
def _wu_body(k, v, beta, gamma, Ai, w, u, bos, eos, i_h, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
             BK: tl.constexpr, BV: tl.constexpr, DOT_PREC: tl.constexpr):
    """W = T (beta exp(gamma) K), U = T (beta V), stored in the input dtype."""
    dt = k.dtype.element_ty
    r = tl.arange(0, 64)
    t = bos + r
    m_t = t < eos
    b_t = tl.load(Ai + (t * H + i_h)[:, None] * 64 + r[None, :], mask=m_t[:, None], other=0.).to(dt)
    b_beta = tl.load(beta + t * H + i_h, mask=m_t, other=0.).to(tl.float32)
    b_gam = tl.load(gamma + t * H + i_h, mask=m_t, other=0.)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m = m_t[:, None] & (o_v < V)[None, :]
        b_v = tl.load(v + (t * H + i_h)[:, None] * V + o_v[None, :], mask=m, other=0.).to(tl.float32)
        b_u = tl.dot(b_t, (b_v * b_beta[:, None]).to(dt), input_precision=DOT_PREC)
        tl.store(u + (t * H + i_h)[:, None] * V + o_v[None, :], b_u.to(u.dtype.element_ty), mask=m)
    b_bg = b_beta * tl.exp(b_gam)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m = m_t[:, None] & (o_k < K)[None, :]
        b_k = tl.load(k + (t * H + i_h)[:, None] * K + o_k[None, :], mask=m, other=0.).to(tl.float32)
        b_w = tl.dot(b_t, (b_k * b_bg[:, None]).to(dt), input_precision=DOT_PREC)
        tl.store(w + (t * H + i_h)[:, None] * K + o_k[None, :], b_w.to(w.dtype.element_ty), mask=m)


@triton.jit
def _prepare_fwd_kernel(k, v, g, beta, gamma, A, Ai, w, u, cu, table, H: tl.constexpr, K: tl.constexpr,
                        V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DOT_PREC: tl.constexpr):
    """Per (chunk, head): gamma and A, then T = (I + A)^-1, then W and U. The barriers make each phase's
    global stores visible to the whole program before the next phase reads them."""
    i_c = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1).to(tl.int64)
    i_n, bos, eos = _chunk_header(table, cu, i_c)
    if bos < 0:
        return
    _kkt_body(k, g, beta, gamma, A, bos, eos, i_h, H, K, BK, DOT_PREC)
    tl.debug_barrier()
    _solve_body(A, Ai, bos, eos, i_h, H)
    tl.debug_barrier()
    _wu_body(k, v, beta, gamma, Ai, w, u, bos, eos, i_h, H, K, V, BK, BV, DOT_PREC)


@triton.jit
def _wu_kernel(k, v, beta, gamma, Ai, w, u, cu, table, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
               BK: tl.constexpr, BV: tl.constexpr, DOT_PREC: tl.constexpr):
    """W and U from a stored T (the backward's recomputation)."""
    i_c = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1).to(tl.int64)
    i_n, bos, eos = _chunk_header(table, cu, i_c)
    if bos < 0:
        return
    _wu_body(k, v, beta, gamma, Ai, w, u, bos, eos, i_h, H, K, V, BK, BV, DOT_PREC)


@triton.jit
def _h_fwd_kernel(k, w, u, gamma, h, vnew, h0, ht, cu, coff, H: tl.constexpr, K: tl.constexpr,
                  V: tl.constexpr, KP: tl.constexpr, BV: tl.constexpr, HAS_H0: tl.constexpr,
                  STORE_HT: tl.constexpr, DOT_PREC: tl.constexpr, REVERSE_SEQS: tl.constexpr = False):
    """Sequential pass per (sequence, head, V block): h[c] = incoming state, V_new = U - W S,
    S <- exp(gamma_L) S + (exp(gamma_L - gamma) K)^T V_new."""
    i_v = tl.program_id(0).to(tl.int64)
    i_n = tl.program_id(1).to(tl.int64) // H
    i_h = tl.program_id(1).to(tl.int64) % H
    if REVERSE_SEQS:
        # the last sequences (MoM's shared-memory streams, the longest) start first: a shorter tail
        i_n = tl.num_programs(1) // H - 1 - i_n
    i_nh = i_n * H + i_h
    dt = k.dtype.element_ty
    bos = tl.load(cu + i_n).to(tl.int64)
    eos = tl.load(cu + i_n + 1).to(tl.int64)
    c0 = tl.load(coff + i_n).to(tl.int64)
    num_c = tl.cdiv(eos - bos, 64)
    r = tl.arange(0, 64)
    o_k = tl.arange(0, KP)
    o_v = i_v * BV + tl.arange(0, BV)
    m_kv = (o_k < K)[:, None] & (o_v < V)[None, :]
    p_kv = o_k[:, None] * V + o_v[None, :]
    b_s = tl.zeros([KP, BV], dtype=tl.float32)
    if HAS_H0:
        b_s += tl.load(h0 + i_nh * K * V + p_kv, mask=m_kv, other=0.).to(tl.float32)
    for i in range(0, num_c):
        t0 = bos + i * 64
        t = t0 + r
        m_t = t < eos
        tl.store(h + ((c0 + i) * H + i_h) * K * V + p_kv, b_s.to(h.dtype.element_ty), mask=m_kv)
        b_w = tl.load(w + (t * H + i_h)[:, None] * K + o_k[None, :], mask=m_t[:, None] & (o_k < K)[None, :],
                      other=0.)
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        b_u = tl.load(u + (t * H + i_h)[:, None] * V + o_v[None, :], mask=m_tv, other=0.).to(tl.float32)
        b_vn = b_u - tl.dot(b_w, b_s.to(dt), input_precision=DOT_PREC)
        tl.store(vnew + (t * H + i_h)[:, None] * V + o_v[None, :], b_vn.to(dt), mask=m_tv)
        t_last = tl.minimum(t0 + 63, eos - 1)
        b_gl = tl.load(gamma + t_last * H + i_h)
        b_gam = tl.load(gamma + t * H + i_h, mask=m_t, other=0.)
        b_kt = tl.load(k + (t * H + i_h)[None, :] * K + o_k[:, None], mask=(o_k < K)[:, None] & m_t[None, :],
                       other=0.)
        # (exp(gamma_L - gamma) K)^T V_new = K^T (exp(gamma_L - gamma) V_new), with the stored rounding of V_new
        b_vd = b_vn.to(dt).to(tl.float32) * tl.exp(tl.where(m_t, b_gl - b_gam, 0.))[:, None]
        b_s = b_s * tl.exp(b_gl) + tl.dot(b_kt, b_vd.to(dt), input_precision=DOT_PREC)
    if STORE_HT:
        tl.store(ht + i_nh * K * V + p_kv, b_s, mask=m_kv)


@triton.jit
def _o_fwd_kernel(q, k, vnew, h, gamma, o, cu, table, scale, H: tl.constexpr, K: tl.constexpr,
                  V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DOT_PREC: tl.constexpr):
    """O = scale [exp(gamma) Q S + tril(Q K^T exp(gamma_i - gamma_j)) V_new] per (chunk, head, V block)."""
    i_c = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1).to(tl.int64)
    i_v = tl.program_id(2).to(tl.int64)
    i_n, bos, eos = _chunk_header(table, cu, i_c)
    if bos < 0:
        return
    dt = q.dtype.element_ty
    r = tl.arange(0, 64)
    t = bos + r
    m_t = t < eos
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    b_o = tl.zeros([64, BV], dtype=tl.float32)
    b_p = tl.zeros([64, 64], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_q = tl.load(q + (t * H + i_h)[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.)
        b_kt = tl.load(k + (t * H + i_h)[None, :] * K + o_k[:, None], mask=m_k[:, None] & m_t[None, :], other=0.)
        b_h = tl.load(h + (i_c * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :],
                      mask=m_k[:, None] & m_v[None, :], other=0.)
        b_o += tl.dot(b_q, b_h, input_precision=DOT_PREC)
        b_p += tl.dot(b_q, b_kt, input_precision=DOT_PREC)
    b_gam = tl.load(gamma + t * H + i_h, mask=m_t, other=0.)
    m_lo = (r[:, None] >= r[None, :]) & m_t[:, None]
    b_p = tl.where(m_lo, b_p * tl.exp(tl.where(m_lo, b_gam[:, None] - b_gam[None, :], 0.)), 0.)
    m_tv = m_t[:, None] & m_v[None, :]
    b_vn = tl.load(vnew + (t * H + i_h)[:, None] * V + o_v[None, :], mask=m_tv, other=0.)
    b_o = b_o * tl.exp(b_gam)[:, None] + tl.dot(b_p.to(dt), b_vn, input_precision=DOT_PREC)
    tl.store(o + (t * H + i_h)[:, None] * V + o_v[None, :], (b_o * scale).to(o.dtype.element_ty), mask=m_tv)


def dot_block(n: int) -> int:
    """Block size for a tensor-core dot dimension that covers n: the next power of two, at least 64 (masked).

    Triton 3.6 on Hopper miscompiles the WY kernels when a bf16/fp16 dot dimension is 16 or 32 and the two
    loops that share the T operand have different widths: shared-memory reads out of bounds in `_wu_kernel`
    and `_prepare_fwd_kernel` (K=32 V=64, K=16 V=32; an illegal memory access) or silently wrong W (K=64
    V=32). Blocks of 64 or more never produce those shapes; the masked columns cost nothing at the head
    sizes where they occur."""
    return max(64, triton.next_power_of_2(n))


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get true fp32 products (Triton's default for fp32 is tf32)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def launch_config(dtype: torch.dtype, num_warps: int, num_stages: int = 3) -> dict:
    """fp32 tiles (and their fp32 products) are twice as large: one stage, so shared memory fits on Hopper."""
    return dict(num_warps=num_warps, num_stages=1 if dtype == torch.float32 else num_stages)


def seq_config(K: int, V: int, dtype: torch.dtype, backward: bool, device: torch.device | None = None) -> dict:
    """Block and launch sizes of the sequential state kernels (checked against register spills and shared
    memory with Triton 3.6). Wide heads on a GPU with Hopper's 227 KiB of shared memory per block get the
    settings tuned by scripts/tune_chunk_kernels.py at MoM-340M sizes (h_fwd 0.60 -> 0.51 ms, dh_bwd 1.19 ->
    0.74 ms per layer on an H100); elsewhere a backward with K > 128 keeps to one stage so it fits."""
    if dtype == torch.float32:
        return dict(BV=min(16, triton.next_power_of_2(V)), num_warps=8, num_stages=1)
    BV = min(32, triton.next_power_of_2(V))
    if K > 128 and max_shared_memory(device) >= 227 * 1024:
        # sequences in reverse grid order: MoM's shared-memory streams (last, longest) start first
        # (H200, MoM-340M buffer: h_fwd 0.769 -> 0.735 ms, dh_bwd 0.986 -> 0.956 ms)
        # masked V tiles (V not a multiple of BV) take more shared memory in the backward: one stage there
        # (two need 242 KB at K=256, V=100)
        stages = 1 if backward and V % BV else 2
        return dict(BV=BV, num_warps=4, num_stages=stages, REVERSE_SEQS=True)
    stages = 1 if backward and K > 128 else 2
    return dict(BV=BV, num_warps=8, num_stages=stages)


@functools.lru_cache(maxsize=None)
def _device_shared_memory(index: int) -> int:
    return triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]


def max_shared_memory(device: torch.device | None) -> int:
    """Shared memory per block (bytes) of a CUDA device; 0 off CUDA (the interpreter)."""
    if device is None or device.type != "cuda":
        return 0
    return _device_shared_memory(device.index if device.index is not None else torch.cuda.current_device())


def chunk_tables(cu: torch.Tensor, num_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cu int32 [N+1] -> (chunk offsets coff int32 [N+1]: first slot of each sequence, chunk table int32
    [num_slots, 2] of (sequence, first token) with first token -1 for unused slots). One launch, no sync."""
    N = cu.shape[0] - 1
    coff = torch.empty(N + 1, device=cu.device, dtype=torch.int32)
    table = torch.empty(num_slots, 2, device=cu.device, dtype=torch.int32)
    _chunk_table_kernel[(1,)](cu, coff, table, N, num_slots, LOG_N=max(1, N.bit_length()), BN=1024, BC=1024,
                              num_warps=4)
    return coff, table


def prepare_fwd(k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, cu: torch.Tensor,
                table: torch.Tensor, config: dict | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """gamma [TT, H] fp32 (in-chunk cumsum of g), T = (I + A)^-1 [TT, H, 64] fp32, W [TT, H, K] and
    U [TT, H, V] in k's dtype. config overrides the launch (BV, num_warps, num_stages) for tuning."""
    TT, H, K = k.shape
    V = v.shape[-1]
    gamma = torch.empty(TT, H, device=k.device, dtype=torch.float32)
    A = torch.empty(TT, H, BT, device=k.device, dtype=torch.float32)
    Ai = torch.empty_like(A)
    w = torch.empty_like(k)
    u = torch.empty(TT, H, V, device=k.device, dtype=k.dtype)
    cfg = {"BV": min(64, dot_block(V)), **launch_config(k.dtype, 4), **(config or {})}
    _prepare_fwd_kernel[(table.shape[0], H)](k, v, g, beta, gamma, A, Ai, w, u, cu, table, H=H, K=K, V=V,
                                             BK=min(64, dot_block(K)), DOT_PREC=dot_precision(k.dtype),
                                             **cfg)
    return gamma, Ai, w, u


def wu_fwd(k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, gamma: torch.Tensor, Ai: torch.Tensor,
           cu: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [TT, H, K] and U [TT, H, V] in k's dtype from a stored T."""
    TT, H, K = k.shape
    V = v.shape[-1]
    w = torch.empty_like(k)
    u = torch.empty(TT, H, V, device=k.device, dtype=k.dtype)
    _wu_kernel[(table.shape[0], H)](k, v, beta, gamma, Ai, w, u, cu, table, H=H, K=K, V=V,
                                    BK=min(64, dot_block(K)), BV=min(64, dot_block(V)),
                                    DOT_PREC=dot_precision(k.dtype), **launch_config(k.dtype, 4))
    return w, u


def h_fwd(k: torch.Tensor, w: torch.Tensor, u: torch.Tensor, gamma: torch.Tensor, cu: torch.Tensor,
          coff: torch.Tensor, num_slots: int, initial_state: torch.Tensor | None, output_final_state: bool,
          config: dict | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-chunk incoming states h [NC, H, K, V] (k's dtype), V_new [TT, H, V] (k's dtype), final [N, H, K, V].
    config overrides seq_config (BV, num_warps, num_stages) for benchmarks."""
    TT, H, K = k.shape
    V = u.shape[-1]
    N = cu.shape[0] - 1
    h = torch.empty(num_slots, H, K, V, device=k.device, dtype=k.dtype)
    vnew = torch.empty_like(u)
    ht = torch.empty(N, H, K, V, device=k.device, dtype=torch.float32) if output_final_state else None
    cfg = config or seq_config(K, V, k.dtype, backward=False, device=k.device)
    grid = (triton.cdiv(V, cfg["BV"]), N * H)
    _h_fwd_kernel[grid](k, w, u, gamma, h, vnew, initial_state, ht, cu, coff, H=H, K=K, V=V,
                        KP=dot_block(K), HAS_H0=initial_state is not None,
                        STORE_HT=output_final_state, DOT_PREC=dot_precision(k.dtype), **cfg)
    return h, vnew, ht


def o_fwd(q: torch.Tensor, k: torch.Tensor, vnew: torch.Tensor, h: torch.Tensor, gamma: torch.Tensor,
          cu: torch.Tensor, table: torch.Tensor, scale: float, out_dtype: torch.dtype,
          config: dict | None = None) -> torch.Tensor:
    """Output o [TT, H, V] in out_dtype. config overrides the launch (BV, num_warps, num_stages) for tuning."""
    TT, H, K = q.shape
    V = vnew.shape[-1]
    o = torch.empty(TT, H, V, device=q.device, dtype=out_dtype)
    fp32 = q.dtype == torch.float32
    cfg = {"BV": min(64 if fp32 else 128, dot_block(V)), **launch_config(q.dtype, 4 if fp32 else 8),
               **(config or {})}
    grid = (table.shape[0], H, triton.cdiv(V, cfg["BV"]))
    _o_fwd_kernel[grid](q, k, vnew, h, gamma, o, cu, table, scale, H=H, K=K, V=V,
                        BK=min(64, dot_block(K)), DOT_PREC=dot_precision(q.dtype), **cfg)
    return o
