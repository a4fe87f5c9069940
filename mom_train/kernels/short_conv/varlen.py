"""Triton short causal depthwise convolution over one packed buffer of segments (forward and backward).

Rows are tokens of the packed buffer [L, C]; `pos[t]` is the position of token t inside its segment and
`seg[t]` the segment index (both int32 [L], built on the device by `segment_index`). A tap that would read
before the segment start reads the segment's initial state instead, so no window crosses a boundary; the
kernels take the state transposed to [N, W-1, C] so that its rows load contiguously like x.
The backward recomputes the pre-activation, so the forward saves only its inputs. One launch per direction.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _conv_preact(x_tile, w, state, pos_t, seg_t, rows, cols, mrow, mcol, stride_x, C,
                 W: tl.constexpr, HAS_STATE: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """Pre-activation z [BT, BC] fp32 of the output rows at `rows` (int32 [BT], relative to the pointer x_tile)
    and channels `cols` ([BC]); pos_t, seg_t: their segment positions and indices."""
    acc = tl.zeros([BT, BC], dtype=tl.float32)
    for j in tl.static_range(W):
        wj = tl.load(w + cols * W + j, mask=mcol, other=0.0).to(tl.float32)
        shift = W - 1 - j
        # taps inside the segment read x; the ones before its start are added from the state below
        m_x = (mrow & (pos_t >= shift))[:, None] & mcol[None, :]
        xv = tl.load(x_tile + ((rows - shift) * stride_x)[:, None] + cols[None, :], mask=m_x, other=0.0)
        acc += xv.to(tl.float32) * wj[None, :]
    if HAS_STATE:
        # only tiles holding one of the first W-1 tokens of a segment read the state (slot pos + j)
        if tl.min(tl.where(mrow, pos_t, W), axis=0) < W - 1:
            for j in tl.static_range(W - 1):
                wj = tl.load(w + cols * W + j, mask=mcol, other=0.0).to(tl.float32)
                m_s = (mrow & (pos_t < W - 1 - j))[:, None] & mcol[None, :]
                # state rows [N, W-1, C]: slot pos + j of segment seg
                s_row = (seg_t.to(tl.int64) * (W - 1) + pos_t + j) * C
                acc += tl.load(state + s_row[:, None] + cols[None, :], mask=m_s, other=0.0).to(tl.float32) * wj[None, :]
    return acc


@triton.jit
def _short_conv_fwd_kernel(x, w, state, pos, seg, y, L, C, stride_x, stride_y,
                           W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                           HAS_STATE: tl.constexpr, SILU: tl.constexpr):
    row0 = tl.program_id(0) * BT
    local = tl.arange(0, BT)
    rows = row0 + local
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    mrow = rows < L
    mcol = cols < C
    pos_t = tl.load(pos + rows, mask=mrow, other=0)
    seg_t = tl.load(seg + rows, mask=mrow, other=0)
    # 64-bit tile base, 32-bit offsets inside the tile
    x_tile = x + row0.to(tl.int64) * stride_x
    z = _conv_preact(x_tile, w, state, pos_t, seg_t, local, cols, mrow, mcol, stride_x, C, W, HAS_STATE, BT, BC)
    if SILU:
        z = z * tl.sigmoid(z)
    out = y + row0.to(tl.int64) * stride_y + (local * stride_y)[:, None] + cols[None, :]
    tl.store(out, z.to(y.dtype.element_ty), mask=mrow[:, None] & mcol[None, :])


@triton.jit
def _short_conv_bwd_kernel(x, w, state, pos, seg, dy, dx, dw_part, dz_head, L, C,
                           stride_x, stride_dy, stride_dx,
                           W: tl.constexpr, WP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                           NUM_SUB: tl.constexpr, HAS_STATE: tl.constexpr, SILU: tl.constexpr):
    # each program owns NUM_SUB * BT input rows r and the outputs t = r + s (s < W) that read them
    pid_t = tl.program_id(0)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    mcol = cols < C
    taps = tl.arange(0, WP)
    local = tl.arange(0, BT)
    dw_acc = tl.zeros([BC, WP], dtype=tl.float32)
    for sub in range(NUM_SUB):
        row0 = (pid_t * NUM_SUB + sub) * BT
        r = row0 + local
        mr = r < L
        pos_r = tl.load(pos + r, mask=mr, other=0)
        m_r = mr[:, None] & mcol[None, :]
        x_tile = x + row0.to(tl.int64) * stride_x
        dy_tile = dy + row0.to(tl.int64) * stride_dy
        x_r = tl.load(x_tile + (local * stride_x)[:, None] + cols[None, :], mask=m_r, other=0.0).to(tl.float32)
        dx_acc = tl.zeros([BT, BC], dtype=tl.float32)
        for s in tl.static_range(W):
            t = r + s
            mt = t < L
            pos_t = tl.load(pos + t, mask=mt, other=0)
            # output t reads input r through tap W-1-s only when both lie in one segment
            same = mr & mt & (pos_t == pos_r + s)
            m_t = same[:, None] & mcol[None, :]
            dz = tl.load(dy_tile + ((local + s) * stride_dy)[:, None] + cols[None, :], mask=m_t, other=0.0)
            dz = dz.to(tl.float32)
            if SILU:
                seg_t = tl.load(seg + t, mask=mt, other=0)
                z = _conv_preact(x_tile, w, state, pos_t, seg_t, local + s, cols, same, mcol, stride_x, C, W,
                                 HAS_STATE, BT, BC)
                sig = tl.sigmoid(z)
                dz = dz * sig * (1.0 + z * (1.0 - sig))
            if s == 0:
                if W > 1:
                    # keep dz of each segment's first W-1 outputs for the state gradients (done in torch)
                    seg_r = tl.load(seg + r, mask=mr, other=0).to(tl.int64)
                    head = dz_head + (seg_r * (W - 1) + pos_r)[:, None] * C + cols[None, :]
                    tl.store(head, dz, mask=(mr & (pos_r < W - 1))[:, None] & mcol[None, :])
            wj = tl.load(w + cols * W + (W - 1 - s), mask=mcol, other=0.0).to(tl.float32)
            dx_acc += dz * wj[None, :]
            dw_j = tl.sum(dz * x_r, axis=0)  # [BC]
            dw_acc += tl.where(taps[None, :] == W - 1 - s, dw_j[:, None], 0.0)
        out = dx + row0.to(tl.int64) * stride_dx + (local * stride_dx)[:, None] + cols[None, :]
        tl.store(out, dx_acc.to(dx.dtype.element_ty), mask=m_r)
    part = dw_part + pid_t.to(tl.int64) * C * W + cols[:, None] * W + taps[None, :]
    tl.store(part, dw_acc, mask=mcol[:, None] & (taps[None, :] < W))


def segment_index(cu_seqlens: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Segment index and position inside the segment of every packed token: int32 [L] each (no host sync)."""
    t = torch.arange(num_tokens, device=cu_seqlens.device, dtype=torch.long)
    cu = cu_seqlens.long()
    seg = torch.searchsorted(cu[1:], t, right=True).clamp_(max=cu.numel() - 2)
    pos = t - cu[seg]
    return seg.to(torch.int32), pos.to(torch.int32)


def short_conv_fwd(x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor | None, seg: torch.Tensor,
                   pos: torch.Tensor, activation: str | None, y: torch.Tensor) -> torch.Tensor:
    """Fill y [L, C] (row stride free, unit channel stride) from x [L, C]; weight [C, W] contiguous;
    state [N, W-1, C] contiguous (transposed initial state) or None; seg, pos int32 [L]."""
    L, C = x.shape
    W = weight.shape[1]
    BT, BC = 32, min(128, triton.next_power_of_2(C))
    has_state = state is not None and W > 1
    grid = (triton.cdiv(L, BT), triton.cdiv(C, BC))
    _short_conv_fwd_kernel[grid](
        x, weight, state if has_state else x, pos, seg, y, L, C, x.stride(0), y.stride(0),
        W=W, BT=BT, BC=BC, HAS_STATE=has_state, SILU=activation == "silu", num_warps=8)
    return y


def short_conv_bwd(x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor | None, seg: torch.Tensor,
                   pos: torch.Tensor, activation: str | None, dy: torch.Tensor, dx: torch.Tensor,
                   num_seqs: int, num_sub: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Fill dx [L, C]; return (dx, dweight [C, W] fp32, dstate [N, W-1, C] fp32 or None); state [N, W-1, C]
    as in `short_conv_fwd`. num_sub: row blocks per program (default: grows with L so the per-program
    dweight partials stay small)."""
    L, C = x.shape
    W = weight.shape[1]
    # 8 rows per block: the pre-activation is recomputed W times per block, larger blocks spill registers
    BT, BC = 8, min(128, triton.next_power_of_2(C))
    if num_sub is None:
        num_sub = 1
        while num_sub < 16 and L >= BT * num_sub * 2 * 256:
            num_sub *= 2
    num_row_programs = triton.cdiv(L, BT * num_sub)
    has_state = state is not None and W > 1
    dw_part = x.new_empty(num_row_programs, C, W, dtype=torch.float32)
    dz_head = x.new_zeros(num_seqs, max(W - 1, 1), C, dtype=torch.float32)
    grid = (num_row_programs, triton.cdiv(C, BC))
    _short_conv_bwd_kernel[grid](
        x, weight, state if has_state else x, pos, seg, dy, dx, dw_part, dz_head, L, C,
        x.stride(0), dy.stride(0), dx.stride(0),
        W=W, WP=triton.next_power_of_2(W), BT=BT, BC=BC, NUM_SUB=num_sub, HAS_STATE=has_state,
        SILU=activation == "silu", num_warps=4)
    dweight = dw_part.sum(0)
    dstate = None
    if W > 1:
        # taps that read the state: output p of a segment reads slot i = p + j (needs p + j < W-1)
        dz_head = dz_head[:, :W - 1]  # [N, W-1 (p), C]
        slot_taps = _state_taps(W, x.device)  # [W-1 (p), W-1 (i), W (j)] one-hot of j = i - p
        # two-operand contractions only, so no [N, W-1, W-1, W, C] intermediate appears
        slot_weight = torch.einsum("pij,cj->pic", slot_taps, weight.float())  # [W-1, W-1, C]
        dstate = torch.einsum("npc,pic->nic", dz_head, slot_weight)
        if has_state:
            products = torch.einsum("npc,nic->pic", dz_head, state.float())  # [W-1, W-1, C]
            dweight = dweight + torch.einsum("pic,pij->cj", products, slot_taps)
    return dx, dweight, dstate


def _state_taps(W: int, device: torch.device) -> torch.Tensor:
    """One-hot [W-1, W-1, W]: entry (p, i, j) is 1 when output position p reads state slot i through tap j."""
    p = torch.arange(W - 1, device=device)[:, None, None]
    i = torch.arange(W - 1, device=device)[None, :, None]
    j = torch.arange(W, device=device)[None, None, :]
    return (j == i - p).float()


class _ShortConvFunction(torch.autograd.Function):
    """y [L, C] = act(causal depthwise conv of x [L, C] per segment), differentiable in x, weight, state."""

    @staticmethod
    def forward(ctx, x, weight, state, seg, pos, activation, num_seqs):
        y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
        short_conv_fwd(x, weight, state, seg, pos, activation, y)
        ctx.save_for_backward(x, weight, state, seg, pos)
        ctx.activation = activation
        ctx.num_seqs = num_seqs
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, state, seg, pos = ctx.saved_tensors
        if dy.stride(-1) != 1:
            dy = dy.contiguous()
        dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
        dx, dweight, dstate = short_conv_bwd(x, weight, state, seg, pos, ctx.activation, dy, dx, ctx.num_seqs)
        if state is None or not ctx.needs_input_grad[2]:
            dstate = None
        else:
            dstate = torch.zeros_like(state) if dstate is None else dstate.to(state.dtype)
        return dx, dweight.to(weight.dtype), dstate, None, None, None, None


def short_conv_triton(x: torch.Tensor, weight: torch.Tensor, cu_seqlens: torch.Tensor,
                      initial_state: torch.Tensor | None, activation: str | None) -> torch.Tensor:
    """x [L, C] packed rows, cu_seqlens int32 [N+1] -> y [L, C] in x's dtype (differentiable)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    seg, pos = segment_index(cu_seqlens, x.shape[0])
    state = initial_state.transpose(1, 2).contiguous() if initial_state is not None else None  # [N, W-1, C]
    return _ShortConvFunction.apply(x, weight.contiguous(), state, seg, pos, activation, cu_seqlens.numel() - 1)
