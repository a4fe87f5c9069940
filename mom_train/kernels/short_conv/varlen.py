"""Triton short causal depthwise convolution over one packed buffer of segments (forward and backward).

Rows are tokens of the packed buffer [L, C]; `pos[t]` is the position of token t inside its segment and
`seg[t]` the segment index (both int32 [L], built on the device by `segment_index`). A tap that would read
before the segment start reads the segment's initial state instead, so no window crosses a boundary; the
kernels take the state transposed to [N, W-1, C] so that its rows load contiguously like x.
The backward recomputes the pre-activation, so the forward saves only its inputs. One launch forward, three
backward (dz = dy * act'(z) once per row, then dx and the weight-grad partials, each from dz). Optionally
each head's channels are L2-normalised after the activation (q and k of the gated delta rule), forward and
backward, so no separate norm pass reads the conv output again.
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
def _l2_normalise(y, mcol):
    """Rows of y [BT, BC] fp32 scaled to unit L2 norm (eps 1e-6 under the root, as the gated delta rule's
    l2norm); masked columns must hold 0."""
    return y * tl.rsqrt(tl.sum(tl.where(mcol[None, :], y * y, 0.0), 1) + 1e-6)[:, None]


@triton.jit
def _short_conv_fwd_kernel(x, w, state, pos, seg, y, L, C, stride_x, stride_y, col_step,
                           W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, ALIGN: tl.constexpr,
                           HAS_STATE: tl.constexpr, SILU: tl.constexpr, NORM: tl.constexpr):
    """y = act(conv(x)) for a [BT rows, BC channels] tile; channel tiles start every col_step channels and
    cover col_step of them (col_step = BC, or the head width with NORM, which L2-normalises each tile row)."""
    stride_x = stride_x * ALIGN
    stride_y = stride_y * ALIGN
    row0 = tl.program_id(0) * BT
    local = tl.arange(0, BT)
    rows = row0 + local
    lane = tl.arange(0, BC)
    cols = tl.program_id(1) * col_step + lane
    mrow = rows < L
    mcol = (lane < col_step) & (cols < C)
    pos_t = tl.load(pos + rows, mask=mrow, other=0)
    seg_t = tl.load(seg + rows, mask=mrow, other=0)
    # 64-bit tile base, 32-bit offsets inside the tile
    x_tile = x + row0.to(tl.int64) * stride_x
    z = _conv_preact(x_tile, w, state, pos_t, seg_t, local, cols, mrow, mcol, stride_x, C, W, HAS_STATE, BT, BC)
    if SILU:
        z = z * tl.sigmoid(z)
    if NORM:
        z = _l2_normalise(z, mcol)
    out = y + row0.to(tl.int64) * stride_y + (local * stride_y)[:, None] + cols[None, :]
    tl.store(out, z.to(y.dtype.element_ty), mask=mrow[:, None] & mcol[None, :])


@triton.jit
def _short_conv_dz_kernel(x, w, state, pos, seg, dy, dz, dz_head, L, C, stride_x, stride_dy, col_step,
                          W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, ALIGN: tl.constexpr,
                          HAS_STATE: tl.constexpr, SILU: tl.constexpr, NORM: tl.constexpr, HEAD: tl.constexpr):
    """Backward pass 1: dz = d(loss)/d(pre-activation) for every row (z recomputed; through the L2 norm too
    with NORM), written to dz [L, C] (contiguous); the rows of each segment's first W-1 outputs also go to
    dz_head [N, W-1, C] fp32 for the state grads. Channel tiles as in the forward."""
    row0 = tl.program_id(0) * BT
    local = tl.arange(0, BT)
    rows = row0 + local
    lane = tl.arange(0, BC)
    cols = tl.program_id(1) * col_step + lane
    mrow = rows < L
    mcol = (lane < col_step) & (cols < C)
    m = mrow[:, None] & mcol[None, :]
    stride_x = stride_x * ALIGN
    stride_dy = stride_dy * ALIGN
    dy_tile = dy + row0.to(tl.int64) * stride_dy
    g = tl.load(dy_tile + (local * stride_dy)[:, None] + cols[None, :], mask=m, other=0.0).to(tl.float32)
    pos_t = tl.load(pos + rows, mask=mrow, other=0)
    if SILU or NORM:
        seg_t = tl.load(seg + rows, mask=mrow, other=0)
        x_tile = x + row0.to(tl.int64) * stride_x
        z = _conv_preact(x_tile, w, state, pos_t, seg_t, local, cols, mrow, mcol, stride_x, C, W, HAS_STATE,
                         BT, BC)
        if SILU:
            sig = tl.sigmoid(z)
            a = z * sig
        else:
            a = z
        if NORM:
            # a -> n = a r with r = rsqrt(|a|^2 + eps): da = r (dn - n (n . dn))
            r = tl.rsqrt(tl.sum(tl.where(mcol[None, :], a * a, 0.0), 1) + 1e-6)[:, None]
            n = a * r
            g = r * (g - n * tl.sum(n * g, 1)[:, None])
        if SILU:
            g = g * sig * (1.0 + z * (1.0 - sig))
    out = dz + row0.to(tl.int64) * C + (local * C)[:, None] + cols[None, :]
    tl.store(out, g.to(dz.dtype.element_ty), mask=m)
    if HEAD:
        if tl.min(tl.where(mrow, pos_t, W), axis=0) < W - 1:
            seg_h = tl.load(seg + rows, mask=mrow, other=0).to(tl.int64)
            head = dz_head + (seg_h * (W - 1) + pos_t)[:, None] * C + cols[None, :]
            tl.store(head, g, mask=(mrow & (pos_t < W - 1))[:, None] & mcol[None, :])


@triton.jit
def _tap_product(x_tile, d, local, pos_t, mrow, cols, mcol, stride_x, shift):
    """d [BT, BC] times x shifted back by `shift` rows, zero where that row lies before the segment start."""
    m_x = (mrow & (pos_t >= shift))[:, None] & mcol[None, :]
    xv = tl.load(x_tile + ((local - shift) * stride_x)[:, None] + cols[None, :], mask=m_x, other=0.0)
    return d * xv.to(tl.float32)


@triton.jit
def _short_conv_dw_kernel(x, pos, dz, dw_part, L, C, stride_x,
                          W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, NUM_SUB: tl.constexpr,
                          ALIGN: tl.constexpr):
    """Backward pass 3: per-program weight-grad partials dw_part [programs, C, W], tap j summing
    dz[t] x[t - (W-1-j)] over the program's NUM_SUB * BT rows t whose tap reads inside the segment. Taps go
    in groups of four, each with its own [BT, BC] accumulator (reduced over rows once at the end), so dz is
    read once per group and the shifted x rows hit the cache after the first tap."""
    pid_t = tl.program_id(0)
    local = tl.arange(0, BT)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    mcol = cols < C
    stride_x = stride_x * ALIGN
    part = dw_part + pid_t.to(tl.int64) * C * W + cols * W
    for j0 in tl.static_range(0, W, 4):
        acc0 = tl.zeros([BT, BC], dtype=tl.float32)
        acc1 = tl.zeros([BT, BC], dtype=tl.float32)
        acc2 = tl.zeros([BT, BC], dtype=tl.float32)
        acc3 = tl.zeros([BT, BC], dtype=tl.float32)
        for sub in range(NUM_SUB):
            row0 = (pid_t * NUM_SUB + sub) * BT
            rows = row0 + local
            mrow = rows < L
            pos_t = tl.load(pos + rows, mask=mrow, other=0)
            d = tl.load(dz + row0.to(tl.int64) * C + (local * C)[:, None] + cols[None, :],
                        mask=mrow[:, None] & mcol[None, :], other=0.0).to(tl.float32)
            x_tile = x + row0.to(tl.int64) * stride_x
            acc0 += _tap_product(x_tile, d, local, pos_t, mrow, cols, mcol, stride_x, W - 1 - j0)
            if j0 + 1 < W:
                acc1 += _tap_product(x_tile, d, local, pos_t, mrow, cols, mcol, stride_x, W - 2 - j0)
            if j0 + 2 < W:
                acc2 += _tap_product(x_tile, d, local, pos_t, mrow, cols, mcol, stride_x, W - 3 - j0)
            if j0 + 3 < W:
                acc3 += _tap_product(x_tile, d, local, pos_t, mrow, cols, mcol, stride_x, W - 4 - j0)
        tl.store(part + j0, tl.sum(acc0, 0), mask=mcol)
        if j0 + 1 < W:
            tl.store(part + j0 + 1, tl.sum(acc1, 0), mask=mcol)
        if j0 + 2 < W:
            tl.store(part + j0 + 2, tl.sum(acc2, 0), mask=mcol)
        if j0 + 3 < W:
            tl.store(part + j0 + 3, tl.sum(acc3, 0), mask=mcol)


@triton.jit
def _short_conv_dx_kernel(w, pos, dz, dx, L, C, stride_dx,
                          W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, ALIGN: tl.constexpr):
    """Backward pass 2: dx[r] = sum_s w[W-1-s] dz[r+s] over the outputs r+s in r's segment."""
    row0 = tl.program_id(0) * BT
    local = tl.arange(0, BT)
    r = row0 + local
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    mcol = cols < C
    mr = r < L
    stride_dx = stride_dx * ALIGN
    pos_r = tl.load(pos + r, mask=mr, other=0)
    dz_tile = dz + row0.to(tl.int64) * C
    acc = tl.zeros([BT, BC], dtype=tl.float32)
    for s in tl.static_range(W):
        t = r + s
        mt = t < L
        pos_t = tl.load(pos + t, mask=mt, other=0)
        # output t reads input r through tap W-1-s only when both lie in one segment
        same = mr & mt & (pos_t == pos_r + s)
        d = tl.load(dz_tile + ((local + s) * C)[:, None] + cols[None, :], mask=same[:, None] & mcol[None, :],
                    other=0.0).to(tl.float32)
        wj = tl.load(w + cols * W + (W - 1 - s), mask=mcol, other=0.0).to(tl.float32)
        acc += d * wj[None, :]
    out = dx + row0.to(tl.int64) * stride_dx + (local * stride_dx)[:, None] + cols[None, :]
    tl.store(out, acc.to(dx.dtype.element_ty), mask=mr[:, None] & mcol[None, :])


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
# (scripts/tune_short_conv.py); with an L2 norm the channel tile is the head width (next power of two)
FWD_TILE = (64, 128, 4)
FWD_NORM_TILE = (8, 256, 4)
DZ_TILE = (16, 128, 4)
DZ_NORM_TILE = (16, 256, 4)
DX_TILE = (64, 128, 4)
DW_TILE = (16, 64, 4)


def _channel_tiling(C: int, tile: tuple[int, int, int], norm_dim: int | None) -> tuple[int, int, int, int]:
    """(rows BT, channel tile BC, channel step between tiles, warps) for C channels."""
    BT, BC, num_warps = tile
    if norm_dim is None:
        BC = min(BC, triton.next_power_of_2(C))
        return BT, BC, BC, num_warps
    if C % norm_dim or norm_dim > 256:
        raise ValueError(f"short conv: norm_dim={norm_dim} must divide the {C} channels and be at most 256")
    return BT, triton.next_power_of_2(norm_dim), norm_dim, num_warps


def short_conv_fwd(x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor | None, seg: torch.Tensor,
                   pos: torch.Tensor, activation: str | None, y: torch.Tensor,
                   tile: tuple[int, int, int] | None = None, norm_dim: int | None = None) -> torch.Tensor:
    """Fill y [L, C] (row stride free, unit channel stride) from x [L, C]; weight [C, W] contiguous;
    state [N, W-1, C] contiguous (transposed initial state) or None; seg, pos int32 [L]. norm_dim: L2-normalise
    each row's groups of norm_dim channels (heads) after the activation, as the gated delta rule does q, k."""
    L, C = x.shape
    W = weight.shape[1]
    BT, BC, step, num_warps = _channel_tiling(C, tile or (FWD_TILE if norm_dim is None else FWD_NORM_TILE), norm_dim)
    has_state = state is not None and W > 1
    align = _row_align(x, y)
    grid = (triton.cdiv(L, BT), triton.cdiv(C, step))
    _short_conv_fwd_kernel[grid](
        x, weight, state if has_state else x, pos, seg, y, L, C, x.stride(0) // align, y.stride(0) // align, step,
        W=W, BT=BT, BC=BC, ALIGN=align, HAS_STATE=has_state, SILU=activation == "silu", NORM=norm_dim is not None,
        num_warps=num_warps)
    return y


def short_conv_bwd(x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor | None, seg: torch.Tensor,
                   pos: torch.Tensor, activation: str | None, dy: torch.Tensor, dx: torch.Tensor,
                   num_seqs: int, num_sub: int | None = None, need_dstate: bool = True,
                   norm_dim: int | None = None, tiles: dict[str, tuple[int, int, int]] | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Fill dx [L, C]; return (dx, dweight [C, W] fp32, dstate [N, W-1, C] fp32 or None); state [N, W-1, C]
    and norm_dim as in `short_conv_fwd` (dy is then the gradient of the normalised output). Three launches:
    dz (gradient of the pre-activation) into a [L, C] buffer of dy's dtype, then dx and the per-program
    weight-grad partials from it. num_sub: row tiles per weight-grad program (default: grows with L so the
    partials stay small). need_dstate=False skips the state gradient (returns None) when there is no state to
    differentiate. tiles: launch shapes by launch name ("dz", "dx", "dw") for tuning."""
    L, C = x.shape
    W = weight.shape[1]
    tiles = tiles or {}
    has_state = state is not None and W > 1
    # the first W-1 dz of each segment feed the state gradient and, with a state, part of dweight
    head = W > 1 and (has_state or need_dstate)
    dz = torch.empty(L, C, device=x.device, dtype=dy.dtype)
    # only the state gradient reads it; otherwise dz stands in for the unused pointer
    dz_head = x.new_zeros(num_seqs, W - 1, C, dtype=torch.float32) if head else dz
    BT, BC, step, num_warps = _channel_tiling(
        C, tiles.get("dz") or (DZ_TILE if norm_dim is None else DZ_NORM_TILE), norm_dim)
    align = _row_align(x, dy)
    _short_conv_dz_kernel[(triton.cdiv(L, BT), triton.cdiv(C, step))](
        x, weight, state if has_state else x, pos, seg, dy, dz, dz_head, L, C,
        x.stride(0) // align, dy.stride(0) // align, step,
        W=W, BT=BT, BC=BC, ALIGN=align, HAS_STATE=has_state, SILU=activation == "silu",
        NORM=norm_dim is not None, HEAD=head, num_warps=num_warps)
    BT, BC, _, num_warps = _channel_tiling(C, tiles.get("dx") or DX_TILE, None)
    align = _row_align(dx)
    _short_conv_dx_kernel[(triton.cdiv(L, BT), triton.cdiv(C, BC))](
        weight, pos, dz, dx, L, C, dx.stride(0) // align, W=W, BT=BT, BC=BC, ALIGN=align, num_warps=num_warps)
    BT, BC, _, num_warps = _channel_tiling(C, tiles.get("dw") or DW_TILE, None)
    if num_sub is None:
        num_sub = 1
        while num_sub < 16 and L >= BT * num_sub * 2 * 256:
            num_sub *= 2
    num_row_programs = triton.cdiv(L, BT * num_sub)
    dw_part = x.new_empty(num_row_programs, C, W, dtype=torch.float32)
    align = _row_align(x)
    _short_conv_dw_kernel[(num_row_programs, triton.cdiv(C, BC))](
        x, pos, dz, dw_part, L, C, x.stride(0) // align, W=W, BT=BT, BC=BC, NUM_SUB=num_sub, ALIGN=align,
        num_warps=num_warps)
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
