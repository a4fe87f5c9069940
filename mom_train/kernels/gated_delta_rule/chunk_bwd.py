"""Backward Triton kernels of the chunked gated delta rule (chunk 64, WY form). README.md derives them.

Same packed layout as chunk_fwd.py. No kernel transposes a dot result: every transposed operand is loaded
transposed from memory, and every transposed product (P^T, dT^T, dA^T) is computed with swapped operands.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mom_train.kernels.gated_delta_rule.chunk_fwd import (_chunk_header, dot_block, dot_precision, launch_config,
                                                          max_shared_memory, seq_config)


@triton.jit
def _dv_local_kernel(q, k, do, gamma, dvl, cu, table, scale, H: tl.constexpr, K: tl.constexpr,
                     V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DOT_PREC: tl.constexpr):
    """dV_local = scale P^T dO with P^T[j, i] = k_j.q_i exp(gamma_i - gamma_j) for i >= j (fp32)."""
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
    b_kq = tl.zeros([64, 64], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_k = tl.load(k + (t * H + i_h)[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.)
        b_qt = tl.load(q + (t * H + i_h)[None, :] * K + o_k[:, None], mask=m_k[:, None] & m_t[None, :], other=0.)
        b_kq += tl.dot(b_k, b_qt, input_precision=DOT_PREC)
    b_gam = tl.load(gamma + t * H + i_h, mask=m_t, other=0.)
    # valid columns only: a padded column's gamma (0) minus a valid one could overflow exp
    m_up = (r[:, None] <= r[None, :]) & m_t[None, :]
    b_pt = tl.where(m_up, b_kq * tl.exp(tl.where(m_up, b_gam[None, :] - b_gam[:, None], 0.)), 0.) * scale
    o_v = i_v * BV + tl.arange(0, BV)
    m_tv = m_t[:, None] & (o_v < V)[None, :]
    b_do = tl.load(do + (t * H + i_h)[:, None] * V + o_v[None, :], mask=m_tv, other=0.)
    b_dv = tl.dot(b_pt.to(dt), b_do.to(dt), input_precision=DOT_PREC)
    tl.store(dvl + (t * H + i_h)[:, None] * V + o_v[None, :], b_dv, mask=m_tv)


@triton.jit
def _dh_bwd_kernel(q, k, w, do, dvl, gamma, dh, dv2, dht, dh0, cu, coff, scale, H: tl.constexpr,
                   K: tl.constexpr, V: tl.constexpr, KP: tl.constexpr, BV: tl.constexpr, HAS_DHT: tl.constexpr,
                   STORE_DH0: tl.constexpr, DOT_PREC: tl.constexpr, REVERSE_SEQS: tl.constexpr = False):
    """Reverse pass per (sequence, head, V block): dh[c] = gradient of the state leaving chunk c,
    dU = dV_local + exp(gamma_L - gamma) K dS', dS <- exp(gamma_L) dS' + scale (exp(gamma) Q)^T dO - W^T dU."""
    i_v = tl.program_id(0).to(tl.int64)
    i_n = tl.program_id(1).to(tl.int64) // H
    i_h = tl.program_id(1).to(tl.int64) % H
    if REVERSE_SEQS:
        # the last sequences (MoM's shared-memory streams, the longest) start first: a shorter tail
        i_n = tl.num_programs(1) // H - 1 - i_n
    i_nh = i_n * H + i_h
    dt = q.dtype.element_ty
    bos = tl.load(cu + i_n).to(tl.int64)
    eos = tl.load(cu + i_n + 1).to(tl.int64)
    c0 = tl.load(coff + i_n).to(tl.int64)
    num_c = tl.cdiv(eos - bos, 64)
    r = tl.arange(0, 64)
    o_k = tl.arange(0, KP)
    m_k = o_k < K
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_kv = o_k[:, None] * V + o_v[None, :]
    b_ds = tl.zeros([KP, BV], dtype=tl.float32)
    if HAS_DHT:
        b_ds += tl.load(dht + i_nh * K * V + p_kv, mask=m_kv, other=0.).to(tl.float32)
    for j in range(0, num_c):
        i = num_c - 1 - j
        t0 = bos + i * 64
        t = t0 + r
        m_t = t < eos
        tl.store(dh + ((c0 + i) * H + i_h) * K * V + p_kv, b_ds.to(dh.dtype.element_ty), mask=m_kv)
        t_last = tl.minimum(t0 + 63, eos - 1)
        b_gl = tl.load(gamma + t_last * H + i_h)
        b_gam = tl.load(gamma + t * H + i_h, mask=m_t, other=0.)
        b_k = tl.load(k + (t * H + i_h)[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.)
        m_tv = m_t[:, None] & m_v[None, :]
        b_du = tl.load(dvl + (t * H + i_h)[:, None] * V + o_v[None, :], mask=m_tv, other=0.)
        # the row scalings are applied to the [64, BV] side of each product, never to the K-wide tiles
        b_kds = tl.dot(b_k, b_ds.to(dt), input_precision=DOT_PREC)
        b_du += b_kds * tl.exp(tl.where(m_t, b_gl - b_gam, 0.))[:, None]
        tl.store(dv2 + (t * H + i_h)[:, None] * V + o_v[None, :], b_du.to(dt), mask=m_tv)
        b_qt = tl.load(q + (t * H + i_h)[None, :] * K + o_k[:, None], mask=m_k[:, None] & m_t[None, :], other=0.)
        b_wt = tl.load(w + (t * H + i_h)[None, :] * K + o_k[:, None], mask=m_k[:, None] & m_t[None, :], other=0.)
        b_do = tl.load(do + (t * H + i_h)[:, None] * V + o_v[None, :], mask=m_tv, other=0.).to(tl.float32)
        b_do = b_do * (tl.exp(b_gam) * scale)[:, None]
        b_ds = (b_ds * tl.exp(b_gl) + tl.dot(b_qt, b_do.to(dt), input_precision=DOT_PREC)
                - tl.dot(b_wt, b_du.to(dt), input_precision=DOT_PREC))
    if STORE_DH0:
        tl.store(dh0 + i_nh * K * V + p_kv, b_ds, mask=m_kv)


@triton.jit
def _dqkw_kernel(q, k, vnew, h, dh, do, dv2, gamma, dq, dk, dw, dgp, cu, table, scale, TT,
                 H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                 DOT_PREC: tl.constexpr):
    """Per (chunk, head, K block): dq, dk (output and state-update parts), dW = -dU S^T, and this K block's
    share of d gamma = q.dq - k.dk + [last row] (exp(gamma_L) <S, dS'> + sum_j k_j.dk_j^(S'))."""
    i_c = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1).to(tl.int64)
    i_kb = tl.program_id(2).to(tl.int64)
    i_n, bos, eos = _chunk_header(table, cu, i_c)
    if bos < 0:
        return
    dt = q.dtype.element_ty
    r = tl.arange(0, 64)
    t = bos + r
    m_t = t < eos
    o_k = i_kb * BK + tl.arange(0, BK)
    m_k = o_k < K
    p_h = h + (i_c * H + i_h) * K * V
    p_dh = dh + (i_c * H + i_h) * K * V
    b_dq = tl.zeros([64, BK], dtype=tl.float32)
    b_dks = tl.zeros([64, BK], dtype=tl.float32)
    b_dw = tl.zeros([64, BK], dtype=tl.float32)
    b_dp = tl.zeros([64, 64], dtype=tl.float32)
    b_dpt = tl.zeros([64, 64], dtype=tl.float32)
    b_sds = tl.zeros([BK], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        m_tv = m_t[:, None] & m_v[None, :]
        m_vt = m_v[:, None] & m_t[None, :]
        m_vk = m_v[:, None] & m_k[None, :]
        b_do = tl.load(do + (t * H + i_h)[:, None] * V + o_v[None, :], mask=m_tv, other=0.).to(dt)
        b_dot = tl.load(do + (t * H + i_h)[None, :] * V + o_v[:, None], mask=m_vt, other=0.).to(dt)
        b_vn = tl.load(vnew + (t * H + i_h)[:, None] * V + o_v[None, :], mask=m_tv, other=0.)
        b_vnt = tl.load(vnew + (t * H + i_h)[None, :] * V + o_v[:, None], mask=m_vt, other=0.)
        b_du = tl.load(dv2 + (t * H + i_h)[:, None] * V + o_v[None, :], mask=m_tv, other=0.).to(dt)
        b_ht = tl.load(p_h + o_k[None, :] * V + o_v[:, None], mask=m_vk, other=0.)
        b_dht = tl.load(p_dh + o_k[None, :] * V + o_v[:, None], mask=m_vk, other=0.)
        b_dq += tl.dot(b_do, b_ht, input_precision=DOT_PREC)
        b_dks += tl.dot(b_vn, b_dht, input_precision=DOT_PREC)
        b_dw += tl.dot(b_du, b_ht, input_precision=DOT_PREC)
        b_dp += tl.dot(b_do, b_vnt, input_precision=DOT_PREC)
        b_dpt += tl.dot(b_vn, b_dot, input_precision=DOT_PREC)
        b_sds += tl.sum(b_ht.to(tl.float32) * b_dht.to(tl.float32), 0)
    b_gam = tl.load(gamma + t * H + i_h, mask=m_t, other=0.)
    t_last = tl.minimum(bos + 63, eos - 1)
    b_gl = tl.load(gamma + t_last * H + i_h)
    m_tk = m_t[:, None] & m_k[None, :]
    b_q = tl.load(q + (t * H + i_h)[:, None] * K + o_k[None, :], mask=m_tk, other=0.)
    b_k = tl.load(k + (t * H + i_h)[:, None] * K + o_k[None, :], mask=m_tk, other=0.)
    m_lo = (r[:, None] >= r[None, :]) & m_t[:, None]
    b_dp = tl.where(m_lo, b_dp * tl.exp(tl.where(m_lo, b_gam[:, None] - b_gam[None, :], 0.)), 0.) * scale
    m_up = (r[:, None] <= r[None, :]) & m_t[None, :]
    b_dpt = tl.where(m_up, b_dpt * tl.exp(tl.where(m_up, b_gam[None, :] - b_gam[:, None], 0.)), 0.) * scale
    b_dq = b_dq * (tl.exp(b_gam) * scale)[:, None] + tl.dot(b_dp.to(dt), b_k, input_precision=DOT_PREC)
    b_dks = b_dks * tl.exp(tl.where(m_t, b_gl - b_gam, 0.))[:, None]
    b_dk = b_dks + tl.dot(b_dpt.to(dt), b_q, input_precision=DOT_PREC)
    b_qf = b_q.to(tl.float32)
    b_kf = b_k.to(tl.float32)
    b_dg = tl.sum(b_qf * b_dq, 1) - tl.sum(b_kf * b_dk, 1)
    b_last = tl.exp(b_gl) * tl.sum(b_sds, 0) + tl.sum(tl.sum(b_kf * b_dks, 1), 0)
    b_dg = tl.where(t == t_last, b_dg + b_last, b_dg)
    p_tk = (t * H + i_h)[:, None] * K + o_k[None, :]
    tl.store(dq + p_tk, b_dq, mask=m_tk)
    tl.store(dk + p_tk, b_dk, mask=m_tk)
    tl.store(dw + p_tk, (-b_dw).to(dw.dtype.element_ty), mask=m_tk)
    tl.store(dgp + i_kb * TT * H + t * H + i_h, b_dg, mask=m_t)


@triton.jit
def _wy_bwd_kernel(k, v, beta, gamma, Ai, dw, du, dka, dgp, dk, dv, dbeta, dg, cu, table, TT,
                   H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                   NK: tl.constexpr, DOT_PREC: tl.constexpr):
    """Through W = T (beta e^gamma K), U = T (beta V), T = (I + A)^-1: dk, dv, dbeta, and dg as the reverse
    in-chunk cumsum of d gamma (this kernel's terms plus the K-block shares from _dqkw_kernel)."""
    i_c = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1).to(tl.int64)
    i_n, bos, eos = _chunk_header(table, cu, i_c)
    if bos < 0:
        return
    dt = k.dtype.element_ty
    r = tl.arange(0, 64)
    t = bos + r
    m_t = t < eos
    b_beta = tl.load(beta + t * H + i_h, mask=m_t, other=0.).to(tl.float32)
    b_gam = tl.load(gamma + t * H + i_h, mask=m_t, other=0.)
    b_eg = tl.exp(b_gam)
    b_bg = b_beta * b_eg
    b_dT = tl.zeros([64, 64], dtype=tl.float32)
    b_dTt = tl.zeros([64, 64], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        m_tk = m_t[:, None] & m_k[None, :]
        m_kt = m_k[:, None] & m_t[None, :]
        b_k = tl.load(k + (t * H + i_h)[:, None] * K + o_k[None, :], mask=m_tk, other=0.).to(tl.float32)
        b_kt = tl.load(k + (t * H + i_h)[None, :] * K + o_k[:, None], mask=m_kt, other=0.).to(tl.float32)
        b_dwk = tl.load(dw + (t * H + i_h)[:, None] * K + o_k[None, :], mask=m_tk, other=0.)
        b_dwkt = tl.load(dw + (t * H + i_h)[None, :] * K + o_k[:, None], mask=m_kt, other=0.)
        b_dT += tl.dot(b_dwk.to(dt), (b_kt * b_bg[None, :]).to(dt), input_precision=DOT_PREC)
        b_dTt += tl.dot((b_k * b_bg[:, None]).to(dt), b_dwkt.to(dt), input_precision=DOT_PREC)
    # T^T [i, j] = T [j, i], loaded transposed from memory
    b_tt = tl.load(Ai + (t * H + i_h)[None, :] * 64 + r[:, None], mask=m_t[None, :], other=0.)
    b_dbeta = tl.zeros([64], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        m_tv = m_t[:, None] & m_v[None, :]
        m_vt = m_v[:, None] & m_t[None, :]
        b_v = tl.load(v + (t * H + i_h)[:, None] * V + o_v[None, :], mask=m_tv, other=0.).to(tl.float32)
        b_vt = tl.load(v + (t * H + i_h)[None, :] * V + o_v[:, None], mask=m_vt, other=0.).to(tl.float32)
        b_du = tl.load(du + (t * H + i_h)[:, None] * V + o_v[None, :], mask=m_tv, other=0.)
        b_dut = tl.load(du + (t * H + i_h)[None, :] * V + o_v[:, None], mask=m_vt, other=0.)
        b_dT += tl.dot(b_du.to(dt), (b_vt * b_beta[None, :]).to(dt), input_precision=DOT_PREC)
        b_dTt += tl.dot((b_v * b_beta[:, None]).to(dt), b_dut.to(dt), input_precision=DOT_PREC)
        b_tdu = tl.dot(b_tt.to(dt), b_du.to(dt), input_precision=DOT_PREC)
        tl.store(dv + (t * H + i_h)[:, None] * V + o_v[None, :], (b_tdu * b_beta[:, None]).to(dv.dtype.element_ty),
                 mask=m_tv)
        b_dbeta += tl.sum(b_v * b_tdu, 1)
    # dA = -T^T dT T^T and dA^T = -T dT^T T, restricted to the strictly lower (upper) triangle
    b_dA = -tl.dot(tl.dot(b_tt, b_dT, input_precision=DOT_PREC), b_tt, input_precision=DOT_PREC)
    b_t = tl.load(Ai + (t * H + i_h)[:, None] * 64 + r[None, :], mask=m_t[:, None], other=0.)
    b_dAt = -tl.dot(tl.dot(b_t, b_dTt, input_precision=DOT_PREC), b_t, input_precision=DOT_PREC)
    m_lo = (r[:, None] > r[None, :]) & m_t[:, None]
    m_up = (r[:, None] < r[None, :]) & m_t[None, :]
    b_decay = tl.exp(tl.where(m_lo, b_gam[:, None] - b_gam[None, :], 0.))
    b_dA = tl.where(m_lo, b_dA * b_decay, 0.)
    # M + M^T with M[i, j] = dA_ij exp(gamma_i - gamma_j) beta_i (i > j)
    b_m = (b_dA * b_beta[:, None]
           + tl.where(m_up, b_dAt * tl.exp(tl.where(m_up, b_gam[None, :] - b_gam[:, None], 0.)) * b_beta[None, :], 0.))
    b_dgam = tl.zeros([64], dtype=tl.float32)
    b_kk = tl.zeros([64, 64], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        m_tk = m_t[:, None] & m_k[None, :]
        p_tk = (t * H + i_h)[:, None] * K + o_k[None, :]
        b_k = tl.load(k + p_tk, mask=m_tk, other=0.)
        b_kt = tl.load(k + (t * H + i_h)[None, :] * K + o_k[:, None], mask=m_k[:, None] & m_t[None, :], other=0.)
        b_kk += tl.dot(b_k, b_kt, input_precision=DOT_PREC)
        b_dwk = tl.load(dw + p_tk, mask=m_tk, other=0.)
        b_dk = tl.load(dka + p_tk, mask=m_tk, other=0.)
        b_tdw = tl.dot(b_tt.to(dt), b_dwk.to(dt), input_precision=DOT_PREC)
        b_dk += b_bg[:, None] * b_tdw + tl.dot(b_m.to(dt), b_k, input_precision=DOT_PREC)
        b_x = tl.sum(b_k.to(tl.float32) * b_tdw, 1)
        b_dbeta += b_eg * b_x
        b_dgam += b_bg * b_x
        tl.store(dk + p_tk, b_dk, mask=m_tk)
    # through A_ij = beta_i (k_i . k_j) G_ij: dbeta_i += sum_j dA_ij G_ij k_i.k_j, dgamma from dA o A
    b_dakk = b_dA * b_kk
    b_dbeta += tl.sum(b_dakk, 1)
    b_das = b_dakk * b_beta[:, None]
    b_dgam += tl.sum(b_das, 1) - tl.sum(b_das, 0)
    for i_kb in range(0, NK):
        b_dgam += tl.load(dgp + i_kb * TT * H + t * H + i_h, mask=m_t, other=0.)
    b_dgam = tl.where(m_t, b_dgam, 0.)
    # dg_i = sum_{j >= i} dgamma_j
    b_dg = tl.sum(b_dgam, 0) - tl.cumsum(b_dgam, axis=0) + b_dgam
    tl.store(dg + t * H + i_h, b_dg, mask=m_t)
    tl.store(dbeta + t * H + i_h, b_dbeta, mask=m_t)


def dv_local_bwd(q: torch.Tensor, k: torch.Tensor, do: torch.Tensor, gamma: torch.Tensor, cu: torch.Tensor,
                 table: torch.Tensor, scale: float) -> torch.Tensor:
    """scale P^T dO [TT, H, V] fp32."""
    TT, H, K = q.shape
    V = do.shape[-1]
    dvl = torch.empty(TT, H, V, device=q.device, dtype=torch.float32)
    fp32 = q.dtype == torch.float32
    BV = min(64 if fp32 else 128, dot_block(V))
    grid = (table.shape[0], H, triton.cdiv(V, BV))
    _dv_local_kernel[grid](q, k, do, gamma, dvl, cu, table, scale, H=H, K=K, V=V,
                           BK=min(64, dot_block(K)), BV=BV, DOT_PREC=dot_precision(q.dtype),
                           **launch_config(q.dtype, 4 if fp32 else 8))
    return dvl


def dh_bwd(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, do: torch.Tensor, dvl: torch.Tensor,
           gamma: torch.Tensor, cu: torch.Tensor, coff: torch.Tensor, num_slots: int, scale: float,
           dht: torch.Tensor | None, need_dh0: bool,
           config: dict | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """dh [NC, H, K, V] and dU [TT, H, V] in q's dtype (dh: gradient of each chunk's outgoing state), dh0 fp32.
    config overrides seq_config (BV, num_warps, num_stages) for benchmarks."""
    TT, H, K = q.shape
    V = do.shape[-1]
    N = cu.shape[0] - 1
    dh = torch.empty(num_slots, H, K, V, device=q.device, dtype=q.dtype)
    dv2 = torch.empty(TT, H, V, device=q.device, dtype=q.dtype)
    dh0 = torch.empty(N, H, K, V, device=q.device, dtype=torch.float32) if need_dh0 else None
    cfg = config or seq_config(K, V, q.dtype, backward=True, device=q.device)
    grid = (triton.cdiv(V, cfg["BV"]), N * H)
    _dh_bwd_kernel[grid](q, k, w, do, dvl, gamma, dh, dv2, dht, dh0, cu, coff, scale, H=H, K=K, V=V,
                         KP=dot_block(K), HAS_DHT=dht is not None, STORE_DH0=need_dh0,
                         DOT_PREC=dot_precision(q.dtype), **cfg)
    return dh, dv2, dh0


# chunk-parallel backward kernels with K > 128 in bf16 on Hopper-class shared memory, from
# scripts/tune_chunk_kernels.py at MoM-340M sizes on an H100 (per layer: dqkw 1.22 -> 1.04 ms, wy_bwd
# 0.70 -> 0.57 ms); every variant was checked against the default launch there
WIDE_HEAD_BWD = {"dqkw": dict(BV=64, num_warps=4, num_stages=2), "wy_bwd": dict(BV=32, num_warps=4, num_stages=3)}


def bwd_config(kernel: str, K: int, V: int, dtype: torch.dtype, device: torch.device | None = None) -> dict:
    """Launch settings (BV, num_warps, num_stages) of the chunk-parallel backward kernels dqkw and wy_bwd."""
    # wy_bwd's tuned BV=32 next to its 64-wide K blocks is miscompiled on Hopper unless the V loop runs over
    # two or more full blocks (NaN dk/dv/dg/dbeta at V = 16, 32, 100): other V take the default launch
    tuned = kernel == "dqkw" or V % 64 == 0
    if dtype != torch.float32 and K > 128 and tuned and max_shared_memory(device) >= 227 * 1024:
        cfg = WIDE_HEAD_BWD[kernel]
        return {**cfg, "BV": min(cfg["BV"], dot_block(V))}
    # K > 128 keeps to one stage so its tiles fit in shared memory (3 stages need 242 KB at K=256 on Hopper)
    return {"BV": min(64, dot_block(V)), **launch_config(dtype, 8, num_stages=1 if K > 128 else 3)}


def dqkw_bwd(q: torch.Tensor, k: torch.Tensor, vnew: torch.Tensor, h: torch.Tensor, dh: torch.Tensor,
             do: torch.Tensor, dv2: torch.Tensor, gamma: torch.Tensor, cu: torch.Tensor, table: torch.Tensor,
             scale: float, config: dict | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk (output side) [TT, H, K] fp32, dW [TT, H, K] in q's dtype, d gamma shares [NK, TT, H] fp32.
    config overrides the launch (BV, num_warps, num_stages) for tuning."""
    TT, H, K = q.shape
    V = do.shape[-1]
    BK = min(64, dot_block(K))
    NK = triton.cdiv(K, BK)
    dq = torch.empty(TT, H, K, device=q.device, dtype=torch.float32)
    dk = torch.empty_like(dq)
    dw = torch.empty_like(q)
    dgp = torch.empty(NK, TT, H, device=q.device, dtype=torch.float32)
    grid = (table.shape[0], H, NK)
    cfg = {**bwd_config("dqkw", K, V, q.dtype, q.device), **(config or {})}
    _dqkw_kernel[grid](q, k, vnew, h, dh, do, dv2, gamma, dq, dk, dw, dgp, cu, table, scale, TT, H=H, K=K, V=V,
                       BK=BK, DOT_PREC=dot_precision(q.dtype), **cfg)
    return dq, dk, dw, dgp


def wy_bwd(k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, gamma: torch.Tensor, Ai: torch.Tensor,
           dw: torch.Tensor, dv2: torch.Tensor, dka: torch.Tensor, dgp: torch.Tensor, cu: torch.Tensor,
           table: torch.Tensor, config: dict | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dk [TT, H, K] fp32, dv [TT, H, V] (v's dtype), dbeta and dg [TT, H] fp32. config overrides the launch
    (BV, num_warps, num_stages) for tuning."""
    TT, H, K = k.shape
    V = v.shape[-1]
    dk = torch.empty(TT, H, K, device=k.device, dtype=torch.float32)
    dv = torch.empty_like(v)
    dbeta = torch.empty(TT, H, device=k.device, dtype=torch.float32)
    dg = torch.empty_like(dbeta)
    cfg = {**bwd_config("wy_bwd", K, V, k.dtype, k.device), **(config or {})}
    _wy_bwd_kernel[(table.shape[0], H)](k, v, beta, gamma, Ai, dw, dv2, dka, dgp, dk, dv, dbeta, dg, cu, table, TT,
                                        H=H, K=K, V=V, BK=min(64, dot_block(K)), NK=dgp.shape[0],
                                        DOT_PREC=dot_precision(k.dtype), **cfg)
    return dk, dv, dbeta, dg
