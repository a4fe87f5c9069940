"""Triton short causal depthwise convolution over one packed buffer of segments (forward and backward).

Rows are tokens of the packed buffer [L, C]; `pos[t]` is the position of token t inside its segment and
`seg[t]` the segment index (both int32 [L], built on the device by `segment_index`). A tap that would read
before the segment start reads the segment's initial state instead, so no window crosses a boundary; the
kernels take the state transposed to [N, W-1, C] so that its rows load contiguously like x.
The backward recomputes the pre-activation, so the forward saves only its inputs. One launch forward, two
backward (dz = dy * act'(z) once per row, then dx and the weight-grad partials from dz).
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
                           W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, ALIGN: tl.constexpr,
                           HAS_STATE: tl.constexpr, SILU: tl.constexpr):
    stride_x = stride_x * ALIGN
    stride_y = stride_y * ALIGN
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
def _short_conv_dz_kernel(x, w, state, pos, seg, dy, dz, dz_head, L, C, stride_x, stride_dy,
                          W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, ALIGN: tl.constexpr,
                          HAS_STATE: tl.constexpr, SILU: tl.constexpr, HEAD: tl.constexpr):
    """Backward pass 1: dz = dy * act'(z) for every row (z recomputed), written to dz [L, C] (contiguous);
    the rows of each segment's first W-1 outputs also go to dz_head [N, W-1, C] fp32 for the state grads."""
    row0 = tl.program_id(0) * BT
    local = tl.arange(0, BT)
    rows = row0 + local
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    mrow = rows < L
    mcol = cols < C
    m = mrow[:, None] & mcol[None, :]
    stride_x = stride_x * ALIGN
    stride_dy = stride_dy * ALIGN
    dy_tile = dy + row0.to(tl.int64) * stride_dy
    g = tl.load(dy_tile + (local * stride_dy)[:, None] + cols[None, :], mask=m, other=0.0).to(tl.float32)
    pos_t = tl.load(pos + rows, mask=mrow, other=0)
    if SILU:
        seg_t = tl.load(seg + rows, mask=mrow, other=0)
        x_tile = x + row0.to(tl.int64) * stride_x
        z = _conv_preact(x_tile, w, state, pos_t, seg_t, local, cols, mrow, mcol, stride_x, C, W, HAS_STATE,
                         BT, BC)
        sig = tl.sigmoid(z)
        g = g * sig * (1.0 + z * (1.0 - sig))
    out = dz + row0.to(tl.int64) * C + (local * C)[:, None] + cols[None, :]
    tl.store(out, g.to(dz.dtype.element_ty), mask=m)
    if HEAD:
        if tl.min(tl.where(mrow, pos_t, W), axis=0) < W - 1:
            seg_h = tl.load(seg + rows, mask=mrow, other=0).to(tl.int64)
            head = dz_head + (seg_h * (W - 1) + pos_t)[:, None] * C + cols[None, :]
            tl.store(head, g, mask=(mrow & (pos_t < W - 1))[:, None] & mcol[None, :])


@triton.jit
def _short_conv_dx_kernel(x, w, pos, dz, dx, dw_part, L, C, stride_x, stride_dx,
                          W: tl.constexpr, WP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                          NUM_SUB: tl.constexpr, ALIGN: tl.constexpr):
    """Backward pass 2: dx[r] = sum_s w[W-1-s] dz[r+s] over outputs r+s of r's segment, and per-program
    partial weight grads dw_part [programs, C, W] = sum_r dz[r+s] x[r]. Each program owns NUM_SUB * BT rows."""
    pid_t = tl.program_id(0)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    mcol = cols < C
    taps = tl.arange(0, WP)
    local = tl.arange(0, BT)
    stride_x = stride_x * ALIGN
    stride_dx = stride_dx * ALIGN
    # products dz[r+s] x[r] per tap, summed over rows once at the end (no per-tile cross-warp reduction)
    dw_acc = tl.zeros([WP, BT, BC], dtype=tl.float32)
    for sub in range(NUM_SUB):
        row0 = (pid_t * NUM_SUB + sub) * BT
        r = row0 + local
        mr = r < L
        pos_r = tl.load(pos + r, mask=mr, other=0)
        m_r = mr[:, None] & mcol[None, :]
        x_tile = x + row0.to(tl.int64) * stride_x
        dz_tile = dz + row0.to(tl.int64) * C
        x_r = tl.load(x_tile + (local * stride_x)[:, None] + cols[None, :], mask=m_r, other=0.0).to(tl.float32)
        dx_acc = tl.zeros([BT, BC], dtype=tl.float32)
        for s in tl.static_range(W):
            t = r + s
            mt = t < L
            pos_t = tl.load(pos + t, mask=mt, other=0)
            # output t reads input r through tap W-1-s only when both lie in one segment
            same = mr & mt & (pos_t == pos_r + s)
            d = tl.load(dz_tile + ((local + s) * C)[:, None] + cols[None, :], mask=same[:, None] & mcol[None, :],
                        other=0.0).to(tl.float32)
            wj = tl.load(w + cols * W + (W - 1 - s), mask=mcol, other=0.0).to(tl.float32)
            dx_acc += d * wj[None, :]
            dw_acc += tl.where(taps[:, None, None] == W - 1 - s, (d * x_r)[None, :, :], 0.0)
        out = dx + row0.to(tl.int64) * stride_dx + (local * stride_dx)[:, None] + cols[None, :]
        tl.store(out, dx_acc.to(dx.dtype.element_ty), mask=m_r)
    dw = tl.sum(dw_acc, axis=1)  # [WP, BC]
    part = dw_part + pid_t.to(tl.int64) * C * W + cols[None, :] * W + taps[:, None]
    tl.store(part, dw, mask=(taps[:, None] < W) & mcol[None, :])


def _row_align(*tensors: torch.Tensor) -> int:
    """Largest power of two (<= 16) dividing every row stride: the kernels take strides in these units so
    the compiler can vectorise rows that start on aligned addresses (e.g. slices of a 2056-wide buffer)."""
    align = 16
    while align > 1 and any(t.stride(0) % align for t in tensors):
        align //= 2
    return align


def segment_index(cu_seqlens: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Segment index and position inside the segment of every packed token: int32 [L] each (no host sync)."""
    t = torch.arange(num_tokens, device=cu_seqlens.device, dtype=torch.long)
    cu = cu_seqlens.long()
    seg = torch.searchsorted(cu[1:], t, right=True).clamp_(max=cu.numel() - 2)
    pos = t - cu[seg]
    return seg.to(torch.int32), pos.to(torch.int32)


# launch shapes (rows per tile, channels per tile, warps), tuned on an H100 at MoM-340M sizes
FWD_TILE = (64, 128, 4)
BWD_TILE = (16, 128, 4)


def short_conv_fwd(x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor | None, seg: torch.Tensor,
                   pos: torch.Tensor, activation: str | None, y: torch.Tensor,
                   tile: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Fill y [L, C] (row stride free, unit channel stride) from x [L, C]; weight [C, W] contiguous;
    state [N, W-1, C] contiguous (transposed initial state) or None; seg, pos int32 [L]."""
    L, C = x.shape
    W = weight.shape[1]
    BT, BC, num_warps = tile or FWD_TILE
    BC = min(BC, triton.next_power_of_2(C))
    has_state = state is not None and W > 1
    align = _row_align(x, y)
    grid = (triton.cdiv(L, BT), triton.cdiv(C, BC))
    _short_conv_fwd_kernel[grid](
        x, weight, state if has_state else x, pos, seg, y, L, C, x.stride(0) // align, y.stride(0) // align,
        W=W, BT=BT, BC=BC, ALIGN=align, HAS_STATE=has_state, SILU=activation == "silu", num_warps=num_warps)
    return y


def short_conv_bwd(x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor | None, seg: torch.Tensor,
                   pos: torch.Tensor, activation: str | None, dy: torch.Tensor, dx: torch.Tensor,
                   num_seqs: int, num_sub: int | None = None, tile: tuple[int, int, int] | None = None,
                   need_dstate: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Fill dx [L, C]; return (dx, dweight [C, W] fp32, dstate [N, W-1, C] fp32 or None); state [N, W-1, C]
    as in `short_conv_fwd`. Two launches: dz = dy * act'(z) into a [L, C] buffer of dy's dtype, then dx and
    per-program weight-grad partials from it. num_sub: row tiles per program of the second launch (default:
    grows with L so the partials stay small). need_dstate=False skips the state gradient (returns None) when
    there is no state to differentiate."""
    L, C = x.shape
    W = weight.shape[1]
    BT, BC, num_warps = tile or BWD_TILE
    BC = min(BC, triton.next_power_of_2(C))
    if num_sub is None:
        num_sub = 1
        while num_sub < 16 and L >= BT * num_sub * 2 * 256:
            num_sub *= 2
    has_state = state is not None and W > 1
    # the first W-1 dz of each segment feed the state gradient and, with a state, part of dweight
    head = W > 1 and (has_state or need_dstate)
    dz = torch.empty(L, C, device=x.device, dtype=dy.dtype)
    # only the state gradient reads it; otherwise dz stands in for the unused pointer
    dz_head = x.new_zeros(num_seqs, W - 1, C, dtype=torch.float32) if head else dz
    align = _row_align(x, dy)
    _short_conv_dz_kernel[(triton.cdiv(L, BT), triton.cdiv(C, BC))](
        x, weight, state if has_state else x, pos, seg, dy, dz, dz_head, L, C,
        x.stride(0) // align, dy.stride(0) // align,
        W=W, BT=BT, BC=BC, ALIGN=align, HAS_STATE=has_state, SILU=activation == "silu", HEAD=head,
        num_warps=num_warps)
    num_row_programs = triton.cdiv(L, BT * num_sub)
    dw_part = x.new_empty(num_row_programs, C, W, dtype=torch.float32)
    align = _row_align(x, dx)
    _short_conv_dx_kernel[(num_row_programs, triton.cdiv(C, BC))](
        x, weight, pos, dz, dx, dw_part, L, C, x.stride(0) // align, dx.stride(0) // align,
        W=W, WP=triton.next_power_of_2(W), BT=BT, BC=BC, NUM_SUB=num_sub, ALIGN=align, num_warps=num_warps)
    dweight = dw_part.sum(0)
    dstate = None
    if head:
        # taps that read the state: output p of a segment reads slot i = p + j (needs p + j < W-1)
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
        need_dstate = state is not None and ctx.needs_input_grad[2]
        dx, dweight, dstate = short_conv_bwd(x, weight, state, seg, pos, ctx.activation, dy, dx, ctx.num_seqs,
                                             need_dstate=need_dstate)
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
