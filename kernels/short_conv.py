"""The short causal depthwise convolution of the mixer layers (width W, SiLU), on packed rows, fused.

``y_t = silu(sum_{s < W} w[:, W-1-s] * x_{t-s} * [pos_t >= s])`` for rows ``x [N, C]`` whose index
within their segment is ``pos [N]``: a tap never reaches into another segment (memory, sequence).
``weight [C, W]`` in the layout of torch's causal conv1d (``weight[c, j]`` multiplies ``x_{t-(W-1)+j}``).

One launch forward; the backward computes ``dz = dy * silu'(z)`` (z recomputed) with per-row-block partial
sums of ``dweight``, and ``dx_t = sum_s dz_{t+s} w[:, W-1-s] [pos_{t+s} >= s]`` (row ``t+s`` is in ``t``'s
segment exactly when its position is at least ``s``). With one weight, the shifted rows of ``dz`` come from
the block's own ``dz`` in registers (``tl.gather``) and, past the block's end, from a few halo rows
recomputed: one launch. With groups, ``dz`` goes through memory (float32) to a second launch for ``dx``.
Those are the backward of widths above 4. Up to width 4 (the layers' default is 4) the backward walks each
block's rows in order instead (``SHIFT`` 4), keeping the last ``W - 1`` rows of x and of dz in registers:
every row read once, no gathers, and no recomputation but the ``W - 1`` rows after the block. Arithmetic in
float32.

Axis letters: N rows, C channels, W taps.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from ._common import LAUNCH, _is_hopper, launch

Tensor = torch.Tensor

BN, BC = 64, 128
# The backward's defaults, by the fastest forward+backward GPU time (Triton 3.6, bf16; docs/performance.md,
# "Short-conv backward variants"). Widths up to 4, on an H200 at W = 4: the sequential form, 128 rows of 256
# channels at two warps; backward kernel 206 -> 85 us on the single layer's 8192 x 3072 rows, 295 -> 172 us on
# the MoM layer's k | v rows (24576 x 2048 in 5 groups) against the defaults below. Wider, on an H100: with
# groups dz through memory (712 -> 609 us forward+backward), without dz shifted in registers with 128-wide
# channel blocks (307 -> 274 us).
BWD_SEQ = {"BN": 128, "BC": 256, "SHIFT": 4, "num_warps": 2}
BWD_GROUPED = {"BN": 64, "BC": 64, "SHIFT": 3}
BWD_PLAIN = {"BN": 64, "BC": 128, "SHIFT": 1}


@triton.jit
def _tap(x, pos_t, o_n, o_c, m_n, m_c, s, N, C: tl.constexpr):
    """Rows ``o_n - s`` of ``x [N, C]`` where they are in the same segment (``pos_t >= s``), else 0."""
    m = m_n & (pos_t >= s)
    return tl.load(x + (o_n - s)[:, None] * C + o_c[None, :], mask=m[:, None] & m_c[None, :], other=0.0).to(tl.float32)


@triton.jit
def _pre_activation(x, w, pos_t, o_n, o_c, m_n, m_c, N, C: tl.constexpr, W: tl.constexpr, BN: tl.constexpr,
                    BC: tl.constexpr):
    acc = tl.zeros([BN, BC], dtype=tl.float32)
    for s in tl.static_range(W):
        b_w = tl.load(w + o_c * W + (W - 1 - s), mask=m_c, other=0.0).to(tl.float32)
        acc += _tap(x, pos_t, o_n, o_c, m_n, m_c, s, N, C) * b_w[None, :]
    return acc


@triton.jit
def _block(table, most, N, C: tl.constexpr, W: tl.constexpr, BN: tl.constexpr, GROUPED: tl.constexpr):
    """This program's rows ``[r0, r1)``, its group's weight offset and its slot of the weight-gradient parts: a
    fixed block of ``BN`` rows (slot: the block), or with GROUPED the entry of ``table [P, 4]`` (group, block of
    the group, first row, the group's end: no block holds rows of two groups; slot: group * most + block)."""
    i_p = tl.program_id(0)
    if GROUPED:
        g = tl.load(table + i_p * 4)
        j = tl.load(table + i_p * 4 + 1)
        r0 = tl.load(table + i_p * 4 + 2)
        r1 = tl.load(table + i_p * 4 + 3)
        return r0, r1, g * C * W, g * most + j
    return i_p * BN, N, 0, i_p


@triton.jit
def _tile(table, most, N, C: tl.constexpr, W: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr,
          GROUPED: tl.constexpr):
    """This program's tile: its rows ``o_n`` (``m_n``: inside its block), channels ``o_c`` (``m_c``: < C), the
    block's first row, its group's weight offset and its weight-gradient slot (``_block``)."""
    r0, r1, w_off, slot = _block(table, most, N, C, W, BN, GROUPED)
    o_n = r0 + tl.arange(0, BN)
    o_c = tl.program_id(1) * BC + tl.arange(0, BC)
    return o_n, o_c, o_n < r1, o_c < C, r0, w_off, slot


@triton.jit
def _split_ptrs(y1, y2, y3, o_n, o_c, m_n, m_c, C: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr):
    """Pointers and masks of columns ``o_c`` of rows ``o_n`` in ``y1 [N, S1]`` (columns < S1), ``y2 [N, S2 - S1]``
    and ``y3 [N, C - S2]``."""
    lo, hi = o_c < S1, o_c >= S2
    p1 = y1 + o_n[:, None] * S1 + o_c[None, :]
    p2 = y2 + o_n[:, None] * (S2 - S1) + (o_c - S1)[None, :]
    p3 = y3 + o_n[:, None] * (C - S2) + (o_c - S2)[None, :]
    m = m_n[:, None]
    return p1, p2, p3, m & lo[None, :], m & (m_c & ~lo & ~hi)[None, :], m & (m_c & hi)[None, :]


@triton.jit
def _part_ptr(y1, y2, y3, o_n, o_c, C: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr, BC: tl.constexpr):
    """Where the part boundaries are multiples of ``BC``, this program's channel block lies in one part: the
    pointers of its columns ``o_c`` of rows ``o_n`` in that part (one load or store instead of one per part). The
    part is picked as a scalar base, row stride and first column, so that one tile of pointers is formed."""
    c0 = tl.program_id(1) * BC
    in1 = c0 < S1
    in2 = c0 < S2
    base = tl.where(in1, y1, tl.where(in2, y2, y3))
    stride = tl.where(in1, S1, tl.where(in2, S2 - S1, C - S2))
    first = tl.where(in1, 0, tl.where(in2, S1, S2))
    return base + o_n[:, None] * stride + (o_c - first)[None, :]


@triton.jit
def _conv_fwd_kernel(x, w, pos, table, y1, y2, y3, N, C: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr,
                     W: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr, GROUPED: tl.constexpr):
    o_n, o_c, m_n, m_c, _, w_off, _ = _tile(table, 0, N, C, W, BN, BC, GROUPED)
    pos_t = tl.load(pos + o_n, mask=m_n, other=0)
    z = _pre_activation(x, w + w_off, pos_t, o_n, o_c, m_n, m_c, N, C, W, BN, BC)
    y = z * tl.sigmoid(z)
    if (S1 % BC) + (S2 % BC) == 0:
        p = _part_ptr(y1, y2, y3, o_n, o_c, C, S1, S2, BC)
        tl.store(p, y.to(y1.dtype.element_ty), mask=m_n[:, None] & m_c[None, :])
    else:
        p1, p2, p3, m1, m2, m3 = _split_ptrs(y1, y2, y3, o_n, o_c, m_n, m_c, C, S1, S2)
        tl.store(p1, y.to(y1.dtype.element_ty), mask=m1)
        if S1 < S2:
            tl.store(p2, y.to(y2.dtype.element_ty), mask=m2)
        if S2 < C:
            tl.store(p3, y.to(y3.dtype.element_ty), mask=m3)


@triton.jit
def _dy_rows(dy1, dy2, dy3, o_r, o_c, m_r, m_c, C: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr,
             BC: tl.constexpr):
    """The upstream gradient at rows ``o_r``, columns ``o_c`` (float32; 0 outside), read from its parts."""
    if (S1 % BC) + (S2 % BC) == 0:
        p = _part_ptr(dy1, dy2, dy3, o_r, o_c, C, S1, S2, BC)
        b_dy = tl.load(p, mask=m_r[:, None] & m_c[None, :], other=0.0).to(tl.float32)
    else:
        p1, p2, p3, m1, m2, m3 = _split_ptrs(dy1, dy2, dy3, o_r, o_c, m_r, m_c, C, S1, S2)
        b_dy = tl.load(p1, mask=m1, other=0.0).to(tl.float32)
        if S1 < S2:
            b_dy += tl.load(p2, mask=m2, other=0.0).to(tl.float32)
        if S2 < C:
            b_dy += tl.load(p3, mask=m3, other=0.0).to(tl.float32)
    return b_dy


@triton.jit
def _silu_grad(b_dy, z):
    sig = tl.sigmoid(z)
    return b_dy * sig * (1.0 + z * (1.0 - sig))


@triton.jit
def _dz_rows(x, w, pos, dy1, dy2, dy3, o_r, o_c, m_c, N, C: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr,
             W: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    """``dz = dy * silu'(z)`` at rows ``o_r`` (z recomputed; 0 past N) and those rows' positions."""
    m_r = o_r < N
    pos_r = tl.load(pos + o_r, mask=m_r, other=0)
    z = _pre_activation(x, w, pos_r, o_r, o_c, m_r, m_c, N, C, W, BR, BC)
    return _silu_grad(_dy_rows(dy1, dy2, dy3, o_r, o_c, m_r, m_c, C, S1, S2, BC), z), pos_r


@triton.jit
def _conv_bwd_kernel(x, w, pos, table, dy1, dy2, dy3, dx, dz, dw_part, most, N, C: tl.constexpr,
                     S1: tl.constexpr, S2: tl.constexpr, W: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr,
                     HB: tl.constexpr, GROUPED: tl.constexpr, SHIFT: tl.constexpr):
    """``dx`` of a row block and its part of ``dweight`` (``dw_part [P, W, C]``, tap ``s`` at index ``s``).
    ``dx_t`` needs ``dz_{t+s}``. SHIFT 1: rows of the block are shifted within registers (``tl.gather``), the
    ``W - 1`` rows after the block come from ``dz`` recomputed for ``HB`` halo rows; SHIFT 2: ``dz`` is
    recomputed at every shift (W - 1 more passes over rows the cache holds, no gathers); SHIFT 3: ``dz``
    written to memory (float32) and ``dx`` left to ``_conv_dx_kernel`` (a second pass). Rows past the block's
    end (another group's, with this group's weights) enter only through taps that their positions exclude,
    and not the weight gradient (their taps are masked)."""
    o_n, o_c, m_n, m_c, r0, w_off, slot = _tile(table, most, N, C, W, BN, BC, GROUPED)
    w += w_off
    b_dz, pos_t = _dz_rows(x, w, pos, dy1, dy2, dy3, o_n, o_c, m_c, N, C, S1, S2, W, BN, BC)
    for s in tl.static_range(W):
        part = tl.sum(b_dz * _tap(x, pos_t, o_n, o_c, m_n, m_c, s, N, C), axis=0)
        tl.store(dw_part + (slot * W + s) * C + o_c, part, mask=m_c)
    if SHIFT == 3:  # dz to memory; _conv_dx_kernel reads its shifted rows
        tl.store(dz + o_n[:, None] * C + o_c[None, :], b_dz, mask=m_n[:, None] & m_c[None, :])
    else:
        _dx_rows(b_dz, x, w, pos, dy1, dy2, dy3, dx, r0, o_n, o_c, m_n, m_c, N, C, S1, S2, W, BN, BC, HB, SHIFT)


@triton.jit
def _dx_rows(b_dz, x, w, pos, dy1, dy2, dy3, dx, r0, o_n, o_c, m_n, m_c, N, C: tl.constexpr, S1: tl.constexpr,
             S2: tl.constexpr, W: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr, HB: tl.constexpr,
             SHIFT: tl.constexpr):
    acc = b_dz * tl.load(w + o_c * W + (W - 1), mask=m_c, other=0.0).to(tl.float32)[None, :]
    if SHIFT == 1:
        b_dzh, _ = _dz_rows(x, w, pos, dy1, dy2, dy3, r0 + BN + tl.arange(0, HB), o_c, m_c, N, C, S1, S2, W, HB, BC)
        r = tl.arange(0, BN)
    for s in tl.static_range(1, W):  # row t + s is in row t's segment exactly when its position is >= s
        b_w = tl.load(w + o_c * W + (W - 1 - s), mask=m_c, other=0.0).to(tl.float32)
        if SHIFT == 1:
            src = r + s
            inside = src < BN
            i_in = tl.broadcast_to(tl.where(inside, src, 0)[:, None], [BN, BC])
            i_halo = tl.broadcast_to(tl.where(inside, 0, src - BN)[:, None], [BN, BC])
            b_dzs = tl.where(inside[:, None], tl.gather(b_dz, i_in, 0), tl.gather(b_dzh, i_halo, 0))
            pos_s = tl.load(pos + o_n + s, mask=(o_n + s) < N, other=0)
        else:
            b_dzs, pos_s = _dz_rows(x, w, pos, dy1, dy2, dy3, o_n + s, o_c, m_c, N, C, S1, S2, W, BN, BC)
        acc += tl.where((pos_s >= s)[:, None], b_dzs, 0.0) * b_w[None, :]
    tl.store(dx + o_n[:, None] * C + o_c[None, :], acc.to(dx.dtype.element_ty), mask=m_n[:, None] & m_c[None, :])


@triton.jit
def _conv_dx_kernel(w, pos, table, dz, dx, N, C: tl.constexpr, W: tl.constexpr, BN: tl.constexpr,
                    BC: tl.constexpr, GROUPED: tl.constexpr):
    """``dx`` of a row block from ``dz [N, C]`` (float32) in memory: the backward's second pass with SHIFT 3."""
    o_n, o_c, m_n, m_c, _, w_off, _ = _tile(table, 0, N, C, W, BN, BC, GROUPED)
    w += w_off
    acc = tl.zeros([BN, BC], dtype=tl.float32)
    for s in tl.static_range(W):
        b_w = tl.load(w + o_c * W + (W - 1 - s), mask=m_c, other=0.0).to(tl.float32)
        m_s = (o_n + s) < N
        pos_s = tl.load(pos + o_n + s, mask=m_s, other=0)
        m = m_s & (pos_s >= s)
        b_dz = tl.load(dz + (o_n + s)[:, None] * C + o_c[None, :], mask=m[:, None] & m_c[None, :], other=0.0)
        acc += b_dz * b_w[None, :]
    tl.store(dx + o_n[:, None] * C + o_c[None, :], acc.to(dx.dtype.element_ty), mask=m_n[:, None] & m_c[None, :])


@triton.jit
def _conv_bwd_seq_kernel(x, w, pos, table, dy1, dy2, dy3, dx, dw_part, most, N, C: tl.constexpr, S1: tl.constexpr,
                         S2: tl.constexpr, W: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr,
                         GROUPED: tl.constexpr):
    """SHIFT 4 (W <= 4): the rows of a block one after another, each read once. ``z_t`` from row t and the last
    ``W - 1`` rows of x kept in registers, ``dz_t`` and the weight gradient's sums from it, and ``dx`` of row
    ``t - (W - 1)`` from the last W rows of dz (row t + s is in row t's segment exactly when its position is
    >= s); the block's last ``W - 1`` rows take dz from the rows after it (another group's rows enter only
    through taps that their positions exclude). The next row's loads are issued one row ahead."""
    r0, r1, w_off, slot = _block(table, most, N, C, W, BN, GROUPED)
    end = tl.minimum(r0 + BN, r1)
    o_c = tl.program_id(1) * BC + tl.arange(0, BC)
    m_c = o_c < C
    o_1 = tl.arange(0, 1)
    w += w_off
    # tap s multiplies x_{t-s}: weight column W - 1 - s
    w0 = tl.load(w + o_c * W + (W - 1), mask=m_c, other=0.0).to(tl.float32)[None, :]
    w1 = tl.load(w + o_c * W + (W - 2), mask=m_c & (W > 1), other=0.0).to(tl.float32)[None, :]
    w2 = tl.load(w + o_c * W + (W - 3), mask=m_c & (W > 2), other=0.0).to(tl.float32)[None, :]
    w3 = tl.load(w + o_c * W + (W - 4), mask=m_c & (W > 3), other=0.0).to(tl.float32)[None, :]
    xa = _row_of(x, r0 - 1 + o_1, o_c, m_c, N, C)  # x_{t-1}, x_{t-2}, x_{t-3} at t = r0
    xb = _row_of(x, r0 - 2 + o_1, o_c, m_c, N, C)
    xc = _row_of(x, r0 - 3 + o_1, o_c, m_c, N, C)
    dza = tl.zeros([1, BC], dtype=tl.float32)  # dz_{t-1}, dz_{t-2}, dz_{t-3} (rows before r0: never used)
    dzb = tl.zeros([1, BC], dtype=tl.float32)
    dzc = tl.zeros([1, BC], dtype=tl.float32)
    pa = tl.zeros([1], dtype=tl.int32)  # positions of rows t-1 and t-2
    pb = tl.zeros([1], dtype=tl.int32)
    g0 = tl.zeros([1, BC], dtype=tl.float32)  # the weight gradient's sums, tap by tap
    g1 = tl.zeros([1, BC], dtype=tl.float32)
    g2 = tl.zeros([1, BC], dtype=tl.float32)
    g3 = tl.zeros([1, BC], dtype=tl.float32)
    nx_x = _row_of(x, r0 + o_1, o_c, m_c, N, C)
    nx_p = tl.load(pos + r0 + o_1, mask=(r0 + o_1) < N, other=0).to(tl.int32)
    nx_dy = _dy_rows(dy1, dy2, dy3, r0 + o_1, o_c, (r0 + o_1) < N, m_c, C, S1, S2, BC)
    for t in range(r0, end + W - 1):
        xt, pt, dyt = nx_x, nx_p, nx_dy
        o_n = t + 1 + o_1
        nx_x = _row_of(x, o_n, o_c, m_c, N, C)
        nx_p = tl.load(pos + o_n, mask=o_n < N, other=0).to(tl.int32)
        nx_dy = _dy_rows(dy1, dy2, dy3, o_n, o_c, o_n < N, m_c, C, S1, S2, BC)
        k1 = (pt >= 1)[:, None]
        k2 = (pt >= 2)[:, None]
        k3 = (pt >= 3)[:, None]
        z = w0 * xt
        if W > 1:
            z += tl.where(k1, w1 * xa, 0.0)
        if W > 2:
            z += tl.where(k2, w2 * xb, 0.0)
        if W > 3:
            z += tl.where(k3, w3 * xc, 0.0)
        dz = _silu_grad(dyt, z)
        own = t < end  # rows after the block: their dz serves dx only
        g0 += tl.where(own, dz * xt, 0.0)
        if W > 1:
            g1 += tl.where(own & k1, dz * xa, 0.0)
        if W > 2:
            g2 += tl.where(own & k2, dz * xb, 0.0)
        if W > 3:
            g3 += tl.where(own & k3, dz * xc, 0.0)
        # dx of row r = t - (W - 1): sum over s of dz_{r+s} w_s [pos_{r+s} >= s]
        if W == 1:
            acc = dz * w0
        elif W == 2:
            acc = dza * w0 + tl.where(k1, dz * w1, 0.0)
        elif W == 3:
            acc = dzb * w0 + tl.where((pa >= 1)[:, None], dza * w1, 0.0) + tl.where(k2, dz * w2, 0.0)
        else:
            acc = (dzc * w0 + tl.where((pb >= 1)[:, None], dzb * w1, 0.0) + tl.where((pa >= 2)[:, None], dza * w2, 0.0)
                   + tl.where(k3, dz * w3, 0.0))
        o_r = t - (W - 1) + o_1
        tl.store(dx + o_r[:, None] * C + o_c[None, :], acc.to(dx.dtype.element_ty),
                 mask=(o_r >= r0)[:, None] & m_c[None, :])
        xc, xb, xa = xb, xa, xt
        dzc, dzb, dza = dzb, dza, dz
        pb, pa = pa, pt
    p_w = dw_part + (slot * W) * C + o_c[None, :]
    tl.store(p_w, g0, mask=m_c[None, :])
    if W > 1:
        tl.store(p_w + C, g1, mask=m_c[None, :])
    if W > 2:
        tl.store(p_w + 2 * C, g2, mask=m_c[None, :])
    if W > 3:
        tl.store(p_w + 3 * C, g3, mask=m_c[None, :])


@triton.jit
def _row_of(x, o_r, o_c, m_c, N, C: tl.constexpr):
    """Rows ``o_r`` (``[1]``) of ``x [N, C]`` at columns ``o_c``: a ``[1, BC]`` float32 tile, 0 outside."""
    m = (o_r >= 0) & (o_r < N)
    return tl.load(x + o_r[:, None] * C + o_c[None, :], mask=m[:, None] & m_c[None, :], other=0.0).to(tl.float32)


def _group_table(groups, BR: int, device) -> tuple[Tensor, int]:
    """``[P, 4]`` int32 (group, block of the group, first row, the group's end row) of every ``BR``-row block of
    every group's rows ``[a, b)``, and the most blocks one group has."""
    rows = [(g, j, a + j * BR, b) for g, (a, b) in enumerate(groups) for j in range(triton.cdiv(b - a, BR))]
    most = max((triton.cdiv(b - a, BR) for a, b in groups), default=0)
    return torch.tensor(rows, dtype=torch.int32).reshape(-1, 4).to(device, non_blocking=True), most


def _grid(x: Tensor, groups, opts: dict) -> tuple[tuple[int, int], Tensor, int]:
    """The launch grid (row blocks, channel blocks), the group table (x itself where there are no groups: the
    kernels do not read it) and the most row blocks of one group (of all rows without groups)."""
    N, C = x.shape
    if groups is None:
        table, blocks, most = x, triton.cdiv(N, opts["BN"]), triton.cdiv(N, opts["BN"])
    else:
        table, most = _group_table(groups, opts["BN"], x.device)
        blocks = table.shape[0]
    return (blocks, triton.cdiv(C, opts["BC"])), table, most


class ShortConvFn(torch.autograd.Function):
    """``weight [C, W]``; or ``[G, C, W]`` with ``groups`` (G host ranges of rows, each with its own weight).
    The output is ``[N, C]``, or with ``bounds`` (column boundaries, ascending, inside ``(0, C)``) one
    contiguous tensor per column range."""

    @staticmethod
    def forward(ctx, x, weight, position, groups, bounds):
        N, C = x.shape
        W = weight.shape[-1]
        S1, S2 = (*bounds, C, C)[:2]
        parts = [x.new_empty(N, b - a) for a, b in itertools.pairwise((0, *bounds, C))]
        ys = parts + parts[:1] * (3 - len(parts))  # the kernel's unused outputs: never written
        if N:
            opts = launch("conv.fwd", BN=BN, BC=BC)
            grid, table, _ = _grid(x, groups, opts)
            _conv_fwd_kernel[grid](x, weight, position, table, *ys, N, C=C, S1=S1, S2=S2, W=W,
                                   GROUPED=groups is not None, **opts)
        ctx.save_for_backward(x, weight, position)
        ctx.groups, ctx.S = groups, (S1, S2)
        ctx.bwd = _bwd_options(W, groups is not None, x.device)  # checked here: a bad option fails the forward
        return parts[0] if len(parts) == 1 else tuple(parts)

    @staticmethod
    def backward(ctx, *dys):
        x, weight, position = ctx.saved_tensors
        N, C = x.shape
        W, (S1, S2), groups = weight.shape[-1], ctx.S, ctx.groups
        if N == 0:
            return torch.zeros_like(x), torch.zeros_like(weight), None, None, None
        dys = [d.contiguous() for d in dys]  # autograd gives zeros for a part unused downstream
        dys += dys[:1] * (3 - len(dys))  # the kernel's unused inputs: never read
        opts = ctx.bwd
        grid, table, most = _grid(x, groups, opts)
        # a slot per row block; with groups per (group, block of the group), zero where a group has fewer
        G = 1 if groups is None else weight.shape[0]
        dw_part = (x.new_empty if groups is None else x.new_zeros)(G * most, W, C, dtype=torch.float32)
        dx = torch.empty_like(x)
        if opts["SHIFT"] == 4:
            extra = {k: v for k, v in opts.items() if k != "SHIFT"}
            _conv_bwd_seq_kernel[grid](x, weight, position, table, *dys, dx, dw_part, most, N, C=C, S1=S1, S2=S2,
                                       W=W, GROUPED=groups is not None, **extra)
        else:
            dz = x.new_empty(N, C, dtype=torch.float32) if opts["SHIFT"] == 3 else dx
            _conv_bwd_kernel[grid](x, weight, position, table, *dys, dx, dz, dw_part, most, N, C=C, S1=S1, S2=S2,
                                   W=W, HB=max(2, triton.next_power_of_2(W - 1)), GROUPED=groups is not None, **opts)
        if opts["SHIFT"] == 3:
            extra = {k: v for k, v in opts.items() if k not in ("SHIFT", "BN", "BC")}
            _conv_dx_kernel[grid](weight, position, table, dz, dx, N, C=C, W=W, BN=opts["BN"], BC=opts["BC"],
                                  GROUPED=groups is not None, **extra)
        dw = dw_part.view(G, most, W, C).sum(1).flip(1).transpose(1, 2)  # tap s -> weight column W - 1 - s
        return dx, dw.reshape(weight.shape).to(weight.dtype), None, None, None


def _bwd_options(W: int, grouped: bool, device: torch.device) -> dict:
    """The backward's launch options: the sequential form's defaults up to width 4 unless the launch options
    pick another ``SHIFT``, the others' defaults otherwise. The sequential form keeps at most four rows of
    history: a wider convolution asked for it takes SHIFT 1 (with the options given).

    On Hopper, SHIFT 1 (the shifts gathered in registers) in channel blocks narrower than 32 is refused: Triton
    3.6 fails to compile it there (``PassManager::run failed`` in ``TritonGPUOptimizeThreadLocality``, float32,
    on an H100 and an H200, at four warps and at two)."""
    shift = LAUNCH.get("conv.bwd", {}).get("SHIFT", 4)
    opts = launch("conv.bwd", **(BWD_SEQ if W <= 4 and shift == 4 else BWD_GROUPED if grouped else BWD_PLAIN))
    if opts["SHIFT"] == 4 and W > 4:
        opts["SHIFT"] = 1
    if opts["SHIFT"] == 1 and opts["BC"] < 32 and _is_hopper(device):
        from momkit.config import ConfigError

        why = "" if shift == 1 else f" (width {W} > 4 takes it in place of SHIFT 4)"
        raise ConfigError(f"launch option conv.bwd:BC={opts['BC']} is invalid with SHIFT 1{why} on a Hopper GPU: "
                          "Triton 3.6 cannot compile the gathered shifts in channel blocks narrower than 32; "
                          "use BC >= 32")
    return opts


def short_conv(x: Tensor, weight: Tensor, position: Tensor, groups: list[tuple[int, int]] | None = None,
               split: int | tuple[int, ...] | None = None) -> Tensor | tuple[Tensor, ...]:
    """``x [N, C]`` (float32, float16 or bfloat16), ``weight [C, W]``, ``position [N]`` (int: each row's
    index within its segment) -> ``silu(causal depthwise conv) [N, C]``, differentiable in x and weight.

    With ``groups``, ``weight [G, C, W]`` and G ranges ``[a, b)`` of rows, one after another from row 0 to N:
    each range convolved with its own weight, in one launch (the mixture's memories). With ``split``, one or
    two column boundaries, the output as two or three contiguous tensors: ``split=s`` gives columns ``[:s]``
    and ``[s:]`` (a memory's keys and values), ``split=(s1, s2)`` ``[:s1]``, ``[s1:s2]`` and ``[s2:]``
    (queries, keys and values), so that nothing downstream copies a strided slice."""
    from ._common import check_dtype, interpreter_compat

    check_dtype(x, weight)
    interpreter_compat()
    wdim = 2 if groups is None else 3
    if x.dim() != 2 or weight.dim() != wdim or weight.shape[-2] != x.shape[1] or position.shape != x.shape[:1]:
        want = "weight [C, W]" if groups is None else "weight [G, C, W] with groups"
        raise ValueError(f"short_conv takes x [N, C], {want}, position [N]; got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(position.shape)}")
    if groups is not None:
        groups = [(int(a), int(b)) for a, b in groups]
        ends = [0] + [b for _, b in groups]
        if len(groups) != weight.shape[0] or any(a != e or b < a for (a, b), e in zip(groups, ends, strict=False)) \
                or ends[-1] != x.shape[0]:
            raise ValueError(f"short_conv groups={groups} are invalid: {weight.shape[0]} consecutive row ranges "
                             f"[a, b) from 0 to N={x.shape[0]} (one per weight) expected")
    bounds = () if split is None else (split,) if isinstance(split, int) else tuple(split)
    C = x.shape[1]
    if not (1 <= len(bounds) <= 2 or split is None) or not all(isinstance(b, int) for b in bounds) \
            or list(bounds) != sorted(set(bounds)) or not all(0 < b < C for b in bounds):
        raise ValueError(f"short_conv split={split} is invalid: one or two ascending column boundaries s with "
                         f"0 < s < C={C} expected")
    # the weight in its own dtype (float32 parameters under autocast): read as float32, its gradient in that dtype
    return ShortConvFn.apply(x.contiguous(), weight.contiguous(), position.contiguous(), groups, bounds)
