"""The sequential state passes of the delta family: forward (chunk states and pseudo-values) and reverse
(state gradients and the pseudo-values' full gradient), one program per (segment, head, block of BV value
columns), over the segment's chunks in order; programs of the longest segments start first
(``segment_program``).

Value columns are independent; key rows are not (``w h`` and ``k_dec dh`` sum over K), so each program
holds all of K, as up to four ``[BK, BV]`` key blocks written out one by one (Triton has no arrays of
tiles): every product takes ``[BT, BK]`` operand tiles. Math and buffers: ``kernels/delta/README.md``.

Shapes (packed): q, k, w ``[Ttot, H, K]``; u, v_new, do ``[Ttot, H, V]``; g, qk ``[Ttot, H]``; chunk states
``[NT, H, K, V]``; initial / final states ``[N, H, K, V]`` float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _common
from .._common import CHUNK, dots, launch, mm, pow2, program_slots, segment_program, segment_start

# Gated, the passes read each chunk's cumulative log decays as wy_fwd stored them (GC 1) instead of summing them
# in their sequential loop (GC 0): fewer barriers and no warp shuffles in the loop, and 0.02-0.19 ms less GPU time
# for the MoM layer's forward+backward on an H100 (docs/performance.md, "Launch options")
GC_DEFAULT = 1


@triton.jit
def _chunk_rows(x, bos, i_t, L, i_h, o_v, H: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, USE: tl.constexpr):
    """Chunk ``i_t``'s rows ``[BT, BV]`` of ``x [Ttot, H, V]`` as stored (0 outside the segment), or a zero
    column without USE."""
    if USE:
        o_t = i_t * BT + tl.arange(0, BT)
        m_t = (o_t >= 0) & (o_t < L)
        return tl.load(x + (bos + o_t)[:, None] * H * V + i_h * V + o_v[None, :],
                       mask=m_t[:, None] & (o_v[None, :] < V), other=0.0)
    else:
        return tl.zeros([BT, 1], dtype=tl.float32)


@triton.jit
def _chunk_u_g(u, u_off, g, bos, i_t, L, i_h, o_v, H: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
               GATED: tl.constexpr, U_OFF: tl.constexpr):
    """Chunk ``i_t``'s pseudo-values ``u`` (and ``u_off``, else zeros) ``[BT, BV]`` and decays ``g [BT]``
    (else zeros), as stored, 0 outside the segment."""
    if GATED:
        o_t = i_t * BT + tl.arange(0, BT)
        b_g = tl.load(g + (bos + o_t) * H + i_h, mask=(o_t >= 0) & (o_t < L), other=0.0)
    else:
        b_g = tl.zeros([BT], dtype=tl.float32)
    return (_chunk_rows(u, bos, i_t, L, i_h, o_v, H, V, BT, True),
            _chunk_rows(u_off, bos, i_t, L, i_h, o_v, H, V, BT, U_OFF), b_g)


@triton.jit
def _chunk_qk_g(qk, g, bos, i_t, L, i_h, H: tl.constexpr, BT: tl.constexpr, GATED: tl.constexpr):
    """Chunk ``i_t``'s ``q . k`` and decays ``[BT]`` (GATED, else zeros), 0 outside the segment."""
    o_t = i_t * BT + tl.arange(0, BT)
    m_t = (o_t >= 0) & (o_t < L)
    if GATED:
        b_qk = tl.load(qk + (bos + o_t) * H + i_h, mask=m_t, other=0.0)
        b_g = tl.load(g + (bos + o_t) * H + i_h, mask=m_t, other=0.0)
    else:
        b_qk = tl.zeros([BT], dtype=tl.float32)
        b_g = tl.zeros([BT], dtype=tl.float32)
    return b_qk, b_g


@triton.jit
def _chunk_gc(gc, bos, i_t, L, i_h, H: tl.constexpr, BT: tl.constexpr):
    """Launch option GC: chunk ``i_t``'s decays as ``wy_fwd`` stored them in ``gc [Ttot, H, 2]``: per token the
    log decays summed from the chunk's start and those summed from the token (excluded) to the chunk's end
    ``[BT]``, and the whole chunk's sum (0 outside the segment)."""
    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < L
    p = gc + ((bos + o_t) * H + i_h) * 2
    last = tl.minimum(i_t * BT + BT, L) - 1
    b_gl = tl.load(gc + ((bos + last) * H + i_h) * 2)
    return tl.load(p, mask=m_t, other=0.0), tl.load(p + 1, mask=m_t, other=0.0), b_gl


@triton.jit
def _key_block(x, tok, m_t, i_h, i_k, H: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, TRANS: tl.constexpr):
    """Key block ``i_k`` of one chunk's rows ``tok`` of ``x [Ttot, H, K]``: ``[BT, BK]``, or ``[BK, BT]``
    with TRANS (0 outside the chunk and past K)."""
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    if TRANS:
        return tl.load(x + tok[None, :] * H * K + i_h * K + o_k[:, None], mask=m_k[:, None] & m_t[None, :], other=0.0)
    else:
        return tl.load(x + tok[:, None] * H * K + i_h * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)


@triton.jit
def _state_block(x, base, i_k, o_v, m_v, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr):
    """Pointers and mask of the ``[BK, BV]`` block ``i_k`` of the ``[K, V]`` state at ``x + base``."""
    o_k = i_k * BK + tl.arange(0, BK)
    return x + base + o_k[:, None] * V + o_v[None, :], (o_k[:, None] < K) & m_v[None, :]


@triton.jit
def _state_init(x, i_nh, i_k, o_v, m_v, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, USE: tl.constexpr):
    """Block ``i_k`` of the ``[K, BV]`` state of sequence and head ``i_nh`` in ``x [N, H, K, V]`` (float32),
    or zeros without USE."""
    if USE:
        p, m = _state_block(x, i_nh.to(tl.int64) * K * V, i_k, o_v, m_v, K, V, BK)
        return tl.load(p, mask=m, other=0.0).to(tl.float32)
    else:
        return tl.zeros([BK, o_v.shape[0]], dtype=tl.float32)


@triton.jit
def _store_block(x, i_nh, i_k, b, o_v, m_v, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr):
    """Key block ``i_k`` of a final state (float32) into ``x [N, H, K, V]``."""
    p, m = _state_block(x, i_nh.to(tl.int64) * K * V, i_k, o_v, m_v, K, V, BK)
    tl.store(p, b, mask=m)


@triton.jit
def _dh_read(b_dh, k, tok, m_t, i_h, i_k, H: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, WT: tl.constexpr,
             INTERP: tl.constexpr, PREC: tl.constexpr):
    """Key block ``i_k``'s part of ``K dh``: ``[BT, BV]`` (the decay to the chunk end goes on the sum)."""
    return mm(_key_block(k, tok, m_t, i_h, i_k, H, K, BK, False), b_dh, WT, INTERP, PREC)


@triton.jit
def _dh_update(b_dh, q, w, dh, base, tok, m_t, i_h, i_k, o_v, m_v, b_gC, b_doq, b_dv, scale,
               H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, GATED: tl.constexpr,
               WT: tl.constexpr, INTERP: tl.constexpr, PREC: tl.constexpr):
    """Key block ``i_k`` of one chunk of the reverse pass: stores ``dh_{c+1}`` there and returns
    ``dh_c = gamma_C dh_{c+1} + scale Q^T b_doq - w^T b_dv`` (``b_doq = gamma ∘ dO``, ``b_dv = dv_new``)."""
    p_dh, m_dh = _state_block(dh, base, i_k, o_v, m_v, K, V, BK)
    tl.store(p_dh, b_dh.to(dh.dtype.element_ty), mask=m_dh)
    if GATED:
        b_dh *= b_gC
    b_dh += scale * mm(_key_block(q, tok, m_t, i_h, i_k, H, K, BK, True), b_doq, WT, INTERP, PREC)
    return b_dh - mm(_key_block(w, tok, m_t, i_h, i_k, H, K, BK, True), b_dv, WT, INTERP, PREC)


@triton.jit
def _h_read(b_h, w, tok, m_t, i_h, i_k, H: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, WT: tl.constexpr,
            INTERP: tl.constexpr, PREC: tl.constexpr):
    """Key block ``i_k``'s part of ``w h``: ``[BT, BV]``."""
    return mm(_key_block(w, tok, m_t, i_h, i_k, H, K, BK, False), b_h, WT, INTERP, PREC)


@triton.jit
def _h_update(b_h, k, h, base, tok, m_t, i_h, i_k, o_v, m_v, b_gC, b_vd, H: tl.constexpr, K: tl.constexpr,
              V: tl.constexpr, BK: tl.constexpr, GATED: tl.constexpr, WT: tl.constexpr, INTERP: tl.constexpr,
              PREC: tl.constexpr):
    """Key block ``i_k`` of one chunk of the state pass: stores ``h_c`` there, returns
    ``h_{c+1} = gamma_C h_c + k^T b_vd`` for ``b_vd = (gamma_C / gamma) ∘ v_new`` (the decay applied once
    to the ``[BT, BV]`` values rather than to every ``[BK, BT]`` key block)."""
    p_h, m_h = _state_block(h, base, i_k, o_v, m_v, K, V, BK)
    tl.store(p_h, b_h.to(h.dtype.element_ty), mask=m_h)
    if GATED:
        b_h *= b_gC
    return b_h + mm(_key_block(k, tok, m_t, i_h, i_k, H, K, BK, True), b_vd, WT, INTERP, PREC)


@triton.jit
def _fwd_h_kernel(k, w, u, u_off, g, gc, du_inter, do, h, v_new, dovr, s_wh, h0, ht, cu, chunk_offsets, order, NTOT,
                  TTOT, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                  BK: tl.constexpr, NK: tl.constexpr, BV: tl.constexpr, GATED: tl.constexpr, USE_H0: tl.constexpr,
                  STORE_HT: tl.constexpr, GBWD: tl.constexpr, GC: tl.constexpr,
                  WT: tl.constexpr, INTERP: tl.constexpr, PREC: tl.constexpr):
    """State pass over one segment (a block of V): ``v_new = u - w h`` per chunk, then
    ``h <- gamma_C h + k^T ((gamma_C / gamma) ∘ v_new)``. Stores ``h`` before each chunk and ``v_new``.
    The state is held as ``NK <= 4`` key blocks of ``[BK, BV]``, as in ``_bwd_dh_kernel``. Gated, the
    chunk's decays are summed in the loop (a reduction and a scan over its tokens), or with GC read from
    ``gc`` (``_chunk_gc``). With GBWD (the gated backward, after the reverse pass) also this value block's
    parts of two decay-gradient terms that need ``w h_c``, which is at hand here: the per-chunk
    ``-<du_inter, w h_c>`` into ``s_wh [NV, NTOT, H]`` and the per-token ``do_t . vr_t`` into
    ``dovr [NV, TTOT, H]``, ``vr = u_off - w h_c`` being the pseudo-values without each token's own value
    (``du_inter`` and ``do`` are loaded one chunk ahead like ``u``)."""
    i_n, i_h, i_v = segment_program(order, H, tl.cdiv(V, BV))
    i_nh = i_n * H + i_h
    bos, L, boh = segment_start(cu, chunk_offsets, i_n)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    b_h0 = _state_init(h0, i_nh, 0, o_v, m_v, K, V, BK, USE_H0)
    if NK > 1:
        b_h1 = _state_init(h0, i_nh, 1, o_v, m_v, K, V, BK, USE_H0)
    if NK > 2:
        b_h2 = _state_init(h0, i_nh, 2, o_v, m_v, K, V, BK, USE_H0)
    if NK > 3:
        b_h3 = _state_init(h0, i_nh, 3, o_v, m_v, K, V, BK, USE_H0)
    # u (and u_off) and g feed no tl.dot, so Triton's pipeliner would leave their loads' latency in the
    # sequential loop: they are loaded one chunk ahead
    nx_u, nx_uo, nx_g = _chunk_u_g(u, u_off, g, bos, 0, L, i_h, o_v, H, V, BT, GATED, GBWD)
    nx_dui = _chunk_rows(du_inter, bos, 0, L, i_h, o_v, H, V, BT, GBWD)
    nx_do = _chunk_rows(do, bos, 0, L, i_h, o_v, H, V, BT, GBWD)
    for i_t in range(0, tl.cdiv(L, BT)):
        b_u, b_uo, b_g, b_dui, b_do = nx_u, nx_uo, nx_g, nx_dui, nx_do
        nx_u, nx_uo, nx_g = _chunk_u_g(u, u_off, g, bos, i_t + 1, L, i_h, o_v, H, V, BT, GATED, GBWD)
        nx_dui = _chunk_rows(du_inter, bos, i_t + 1, L, i_h, o_v, H, V, BT, GBWD)
        nx_do = _chunk_rows(do, bos, i_t + 1, L, i_h, o_v, H, V, BT, GBWD)
        base = ((boh + i_t) * H + i_h) * K * V
        o_t = i_t * BT + tl.arange(0, BT)
        m_t = o_t < L
        tok = bos + o_t
        m_tv = m_t[:, None] & m_v[None, :]
        p_v = tok[:, None] * H * V + i_h * V + o_v[None, :]
        b_wh = _h_read(b_h0, w, tok, m_t, i_h, 0, H, K, BK, WT, INTERP, PREC)
        if NK > 1:
            b_wh += _h_read(b_h1, w, tok, m_t, i_h, 1, H, K, BK, WT, INTERP, PREC)
        if NK > 2:
            b_wh += _h_read(b_h2, w, tok, m_t, i_h, 2, H, K, BK, WT, INTERP, PREC)
        if NK > 3:
            b_wh += _h_read(b_h3, w, tok, m_t, i_h, 3, H, K, BK, WT, INTERP, PREC)
        b_v = b_u.to(tl.float32) - b_wh
        tl.store(v_new + p_v, b_v.to(v_new.dtype.element_ty), mask=m_tv)
        if GBWD:
            tl.store(s_wh + (i_v * NTOT + boh + i_t) * H + i_h, -tl.sum(tl.sum(b_dui.to(tl.float32) * b_wh, axis=1),
                                                                         axis=0))
            tl.store(dovr + (i_v * TTOT + tok) * H + i_h,
                     tl.sum(b_do.to(tl.float32) * (b_uo.to(tl.float32) - b_wh), axis=1), mask=m_t)
        if GC:
            _, b_gr, b_gl = _chunk_gc(gc, bos, i_t, L, i_h, H, BT)
            b_gC = tl.exp(b_gl)
            b_v *= tl.exp(b_gr)[:, None]
        else:
            b_g = b_g.to(tl.float32)
            b_gC = tl.exp(tl.sum(b_g, axis=0))
            if GATED:
                b_v *= tl.exp(tl.cumsum(b_g, axis=0, reverse=True) - b_g)[:, None]
        b_h0 = _h_update(b_h0, k, h, base, tok, m_t, i_h, 0, o_v, m_v, b_gC, b_v, H, K, V, BK, GATED, WT, INTERP, PREC)
        if NK > 1:
            b_h1 = _h_update(b_h1, k, h, base, tok, m_t, i_h, 1, o_v, m_v, b_gC, b_v, H, K, V, BK, GATED, WT, INTERP,
                             PREC)
        if NK > 2:
            b_h2 = _h_update(b_h2, k, h, base, tok, m_t, i_h, 2, o_v, m_v, b_gC, b_v, H, K, V, BK, GATED, WT, INTERP,
                             PREC)
        if NK > 3:
            b_h3 = _h_update(b_h3, k, h, base, tok, m_t, i_h, 3, o_v, m_v, b_gC, b_v, H, K, V, BK, GATED, WT, INTERP,
                             PREC)
    if STORE_HT:
        _store_block(ht, i_nh, 0, b_h0, o_v, m_v, K, V, BK)
        if NK > 1:
            _store_block(ht, i_nh, 1, b_h1, o_v, m_v, K, V, BK)
        if NK > 2:
            _store_block(ht, i_nh, 2, b_h2, o_v, m_v, K, V, BK)
        if NK > 3:
            _store_block(ht, i_nh, 3, b_h3, o_v, m_v, K, V, BK)


@triton.jit
def _bwd_dh_kernel(q, k, w, g, gc, qk, do, dv_local, dh, dv_tot, du_inter, dht, dh0, cu, chunk_offsets, order,
                   scale, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                   BK: tl.constexpr, NK: tl.constexpr, BV: tl.constexpr, GATED: tl.constexpr, USE_DHT: tl.constexpr,
                   STORE_DH0: tl.constexpr, GC: tl.constexpr, WT: tl.constexpr, INTERP: tl.constexpr,
                   PREC: tl.constexpr):
    """Reverse state pass: ``dh`` (gradient of the state after each chunk) and ``dv_tot``, the full
    gradient of the pseudo-values ``v_new``: local part + ``k_dec dh`` (written over the local part).
    GATED: the local part comes without its diagonal (added here, not stored), and ``du_inter = k_dec dh``
    is stored instead of ``dv_tot`` (the dqkw kernel sums the three parts itself: one row buffer fewer at
    the backward's peak, and the decay gradient needs ``du_inter`` apart). ``qk [Ttot, H]``: ``q_t . k_t``.

    The decays go on the ``[BT, BV]`` side (``K dh`` then ``k_dec ∘``, ``gamma ∘ dO``), so each key block
    costs three products straight from its loaded tiles; the decay gradient's per-chunk term, which needs
    the states of both passes, is left to the kernels that run after this one (the backward's forward state
    pass and the dqkw kernel).

    The state ``[K, BV]`` is held as ``NK <= 4`` blocks of ``[BK, BV]`` (written out, as Triton has no
    arrays of tiles), so that every product takes ``[BT, BK]`` tiles: a state of all of K in one tile
    needs ``[BT, K]`` operands that do not fit in registers at K >= 128."""
    i_n, i_h, i_v = segment_program(order, H, tl.cdiv(V, BV))
    i_nh = i_n * H + i_h
    bos, L, boh = segment_start(cu, chunk_offsets, i_n)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    b_dh0 = _state_init(dht, i_nh, 0, o_v, m_v, K, V, BK, USE_DHT)
    if NK > 1:
        b_dh1 = _state_init(dht, i_nh, 1, o_v, m_v, K, V, BK, USE_DHT)
    if NK > 2:
        b_dh2 = _state_init(dht, i_nh, 2, o_v, m_v, K, V, BK, USE_DHT)
    if NK > 3:
        b_dh3 = _state_init(dht, i_nh, 3, o_v, m_v, K, V, BK, USE_DHT)
    NT = tl.cdiv(L, BT)
    nx_qk, nx_g = _chunk_qk_g(qk, g, bos, NT - 1, L, i_h, H, BT, GATED)  # one chunk ahead (see _fwd_h_kernel)
    for ii in range(0, NT):
        i_t = NT - 1 - ii
        b_qk, b_g = nx_qk, nx_g
        nx_qk, nx_g = _chunk_qk_g(qk, g, bos, i_t - 1, L, i_h, H, BT, GATED)
        base = ((boh + i_t) * H + i_h) * K * V
        o_t = i_t * BT + tl.arange(0, BT)
        m_t = o_t < L
        tok = bos + o_t
        m_tv = m_t[:, None] & m_v[None, :]
        p_v = tok[:, None] * H * V + i_h * V + o_v[None, :]
        b_do = tl.load(do + p_v, mask=m_tv, other=0.0)
        b_dv = tl.load(dv_local + p_v, mask=m_tv, other=0.0).to(tl.float32)
        b_dui = _dh_read(b_dh0, k, tok, m_t, i_h, 0, H, K, BK, WT, INTERP, PREC)
        if NK > 1:
            b_dui += _dh_read(b_dh1, k, tok, m_t, i_h, 1, H, K, BK, WT, INTERP, PREC)
        if NK > 2:
            b_dui += _dh_read(b_dh2, k, tok, m_t, i_h, 2, H, K, BK, WT, INTERP, PREC)
        if NK > 3:
            b_dui += _dh_read(b_dh3, k, tok, m_t, i_h, 3, H, K, BK, WT, INTERP, PREC)
        # GC (gated only) repeats the gated branch's lines below with the decays read, not summed, so that the
        # default branch stays as it was and compiles to the instructions the GPU tests passed on
        if GC:  # read here, not one chunk ahead: that copy spilled registers at K = V = 256
            b_gf, b_gr, b_gl = _chunk_gc(gc, bos, i_t, L, i_h, H, BT)
            b_gC = tl.exp(b_gl)
            b_dui *= tl.exp(b_gr)[:, None]
            b_do = b_do.to(tl.float32)
            b_dv += (scale * b_qk)[:, None] * b_do  # the diagonal of A
            tl.store(du_inter + p_v, b_dui.to(du_inter.dtype.element_ty), mask=m_tv)
            b_do *= tl.exp(b_gf)[:, None]
            b_dv += b_dui
        else:
            b_g = b_g.to(tl.float32)
            b_gC = tl.exp(tl.sum(b_g, axis=0))
            if GATED:
                b_dui *= tl.exp(tl.cumsum(b_g, axis=0, reverse=True) - b_g)[:, None]
                b_do = b_do.to(tl.float32)
                b_dv += (scale * b_qk)[:, None] * b_do  # the diagonal of A
                tl.store(du_inter + p_v, b_dui.to(du_inter.dtype.element_ty), mask=m_tv)
                b_do *= tl.exp(tl.cumsum(b_g, axis=0))[:, None]
                b_dv += b_dui
            else:
                b_dv += b_dui
                tl.store(dv_tot + p_v, b_dv.to(dv_tot.dtype.element_ty), mask=m_tv)
        b_dh0 = _dh_update(b_dh0, q, w, dh, base, tok, m_t, i_h, 0, o_v, m_v, b_gC, b_do, b_dv, scale, H, K, V, BK,
                           GATED, WT, INTERP, PREC)
        if NK > 1:
            b_dh1 = _dh_update(b_dh1, q, w, dh, base, tok, m_t, i_h, 1, o_v, m_v, b_gC, b_do, b_dv, scale, H, K, V,
                               BK, GATED, WT, INTERP, PREC)
        if NK > 2:
            b_dh2 = _dh_update(b_dh2, q, w, dh, base, tok, m_t, i_h, 2, o_v, m_v, b_gC, b_do, b_dv, scale, H, K, V,
                               BK, GATED, WT, INTERP, PREC)
        if NK > 3:
            b_dh3 = _dh_update(b_dh3, q, w, dh, base, tok, m_t, i_h, 3, o_v, m_v, b_gC, b_do, b_dv, scale, H, K, V,
                               BK, GATED, WT, INTERP, PREC)
    if STORE_DH0:
        _store_block(dh0, i_nh, 0, b_dh0, o_v, m_v, K, V, BK)
        if NK > 1:
            _store_block(dh0, i_nh, 1, b_dh1, o_v, m_v, K, V, BK)
        if NK > 2:
            _store_block(dh0, i_nh, 2, b_dh2, o_v, m_v, K, V, BK)
        if NK > 3:
            _store_block(dh0, i_nh, 3, b_dh3, o_v, m_v, K, V, BK)


def _state_blocks(K: int, V: int) -> tuple[int, int, int]:
    """(BK, NK, BV) of the state passes: the state's K rows in NK <= 4 blocks of BK (64 up to
    K = 256), and value blocks of 32 columns (H100, gated_deltanet at K = V = 256: reverse pass 345 us
    against 474 at 16 columns and 476 at 64 with eight warps; at K = 128 the same or better)."""
    BK = max(min(64, pow2(K)), pow2(K) // 4)
    NK = triton.cdiv(K, BK)
    return BK, NK, min(pow2(V), 32)


def _value_block(meta, H: int, V: int, device: torch.device) -> int:
    """The state passes' value-block width for one launch: 32 columns (``_state_blocks``), or 16 where 32-wide
    blocks would leave more than half of the GPU's program slots idle (a few long sequences, or a group of
    rows of a batch whose states pass the budget): the programs then double and each chunk step costs about
    half (H100, K = V = 256: forward pass 0.52x, reverse 0.68x per step), so the pass takes about that much
    less time. A single block of up to 16 columns stays 32 wide (no more programs to gain). The launch option
    BV overrides it."""
    BV = _state_blocks(1, V)[2]
    per_segment, slots = H * triton.cdiv(V, BV) * 2, program_slots(device)
    # segments with rows number at least num_chunks / max_chunks: that bound settles most calls without a loop
    if V <= 16 or -(-meta.num_chunks // max(meta.max_chunks, 1)) * per_segment > slots:
        return BV
    cu = meta.cu_host
    busy = sum(1 for i in range(meta.num_segments) if cu[i + 1] > cu[i])
    return 16 if busy * per_segment <= slots else BV


def _state_stages(BK: int, NK: int, reverse: bool, wdt: torch.dtype) -> int:
    """Pipeline stages of the state passes, as many as fit in Hopper's 227 KiB of shared memory: a stage
    holds NK key blocks of the chunk's inputs in the work dtype, so the count follows the bfloat16-equivalent
    key width ``NK * BK * bytes / 2``. Forward: three up to 256, else one; reverse: three up to 128, two
    up to 256, else one. Three where they fit were faster on an H100 (gated_deltanet, bfloat16: forward
    pass at K = 256 194 us against 236 at two stages, at K = 128 248 against 343; reverse pass at K = 128
    285 against 341); float32 work buffers (float32 and float16 inputs) at K >= 72 overflow at those."""
    width = NK * BK * (4 if wdt == torch.float32 else 2) // 2
    if reverse:
        return 3 if width <= 128 else 2 if width <= 256 else 1
    return 3 if width <= 256 else 1


def delta_fwd_h(k, w, u, g, h0, output_final_state, meta, gc=None, gbwd=None):
    """Chunk states, pseudo-values ``v_new``, the final states (or None) and, given ``gbwd = (u_off,
    du_inter, do)`` (the gated backward: the pseudo-values without each token's own value, the pseudo-values'
    gradient from later chunks, the output's gradient), the decay gradient's parts per value block
    ``dovr [NV, Ttot, H]`` (``do_t . vr_t``) and ``s_wh [NV, NT, H]`` (``-<du_inter, w h_c>``), else None and
    None. ``gc``: the chunk-local cumulative log decays (``wy_fwd``), read instead of ``g`` under the
    launch option GC."""
    H, K = k.shape[1:]
    Ttot, V = u.shape[0], u.shape[-1]
    N = meta.num_segments
    BK, NK, _ = _state_blocks(K, V)
    opts = launch("delta.fwd_h", num_warps=4, num_stages=_state_stages(BK, NK, False, u.dtype),
                  BV=_value_block(meta, H, V, k.device), GC=GC_DEFAULT)
    BV, GC = opts.pop("BV"), _use_gc(opts, g, gc)
    h = k.new_empty(meta.num_chunks, H, K, V, dtype=u.dtype)
    v_new = torch.empty_like(u)
    ht = k.new_empty(N, H, K, V, dtype=torch.float32) if output_final_state else None
    NV = triton.cdiv(V, BV)
    u_off, du_inter, do = (None, None, None) if gbwd is None else gbwd
    dovr = None if gbwd is None else k.new_empty(NV, Ttot, H, dtype=torch.float32)
    s_wh = None if gbwd is None else k.new_empty(NV, meta.num_chunks, H, dtype=torch.float32)
    _fwd_h_kernel[(N * H * NV,)](k, w, u, u_off, g, gc, du_inter, do, h, v_new, dovr, s_wh, h0, ht, meta.cu,
                                 meta.chunk_offsets, meta.order, meta.num_chunks, Ttot, H=H, K=K, V=V, BT=CHUNK, BK=BK,
                                 NK=NK, BV=BV, GATED=g is not None, USE_H0=h0 is not None,
                                 STORE_HT=output_final_state, GBWD=gbwd is not None, GC=GC,
                                 **dots(k.dtype, False), **opts)
    return h, v_new, ht, dovr, s_wh


def gc_wanted() -> bool:
    """Whether a state pass is set to read the chunk-local cumulative log decays (launch option GC, on by
    default), so that ``wy_fwd`` stores them."""
    return any(_common.LAUNCH.get(name, {}).get("GC", GC_DEFAULT) for name in ("delta.fwd_h", "delta.bwd_dh"))


def _use_gc(opts: dict, g, gc) -> bool:
    """Whether a state pass reads the chunk-local cumulative log decays (launch option GC, gated only)."""
    on = bool(opts.pop("GC")) and g is not None
    if on and gc is None:
        raise ValueError("the launch option GC of the delta state passes needs gc, the chunk-local cumulative "
                         "log decays that wy_fwd returns")
    return on


def delta_bwd_dh(q, k, w, g, qk, do, dv_local, dht, store_dh0, scale, meta, gc=None):
    """The reverse state pass (``_bwd_dh_kernel``): ``(dh, dv_tot, du_inter, dh0)``. Ungated, ``dv_tot`` is
    ``dv_local`` itself, updated in place; gated it is None (its parts are ``dv_local``, the diagonal
    ``scale * qk * do`` and ``du_inter``). None also where not needed: ``du_inter`` ungated, ``dh0``
    without an initial state."""
    H, K = q.shape[1:]
    V = do.shape[-1]
    N, NT = meta.num_segments, meta.num_chunks
    gated = g is not None
    BK, NK, _ = _state_blocks(K, V)
    opts = launch("delta.bwd_dh", num_warps=4, num_stages=_state_stages(BK, NK, True, w.dtype),
                  BV=_value_block(meta, H, V, q.device), GC=GC_DEFAULT)
    BV, GC = opts.pop("BV"), _use_gc(opts, g, gc)
    NV = triton.cdiv(V, BV)
    dh = q.new_empty(NT, H, K, V, dtype=w.dtype)
    dv_tot = None if gated else dv_local
    du_inter = torch.empty_like(dv_local) if gated else None
    dh0 = q.new_empty(N, H, K, V, dtype=torch.float32) if store_dh0 else None
    _bwd_dh_kernel[(N * H * NV,)](q, k, w, g, gc, qk, do, dv_local, dh, dv_tot, du_inter, dht, dh0, meta.cu,
                                  meta.chunk_offsets, meta.order, scale, H=H, K=K, V=V, BT=CHUNK, BK=BK, NK=NK, BV=BV,
                                  GATED=gated, USE_DHT=dht is not None, STORE_DH0=store_dh0, GC=GC,
                                  **dots(q.dtype, False), **opts)
    return dh, dv_tot, du_inter, dh0
