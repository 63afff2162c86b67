"""Chunked forward and backward of the gated linear family: ``S_t = Diag(a_t) S_{t-1} + k_t v_t^T``.

One kernel set for every gate, switched by the constexpr ``GATE``: 0 no gate (linear_attn),
1 per-head log decay ``g [T, H]`` (retnet, mamba2), 2 per-channel log decay (gla: ``gla.py`` applies it
once, and these kernels take its decayed operands);
``HAS_DT`` multiplies each key by a per-head step ``dt [T, H]`` (mamba2: ``k <- dt k``).
The output and local-dv kernels are shared with the delta family (``kernels/delta``), which runs
them on its pseudo-values.

Shapes (packed, see ``kernels/_common.py``): q, k ``[Ttot, H, K]``, v ``[Ttot, H, V]``, chunk states
``h [NT, H, K, V]`` (the state before each chunk), states ``[N, H, K, V]`` float32.
Derivation and gradient formulas: ``kernels/gated_linear/README.md``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import (
    CHUNK,
    chunk_gram,
    chunk_meta,
    chunk_start,
    contiguous,
    dots,
    launch,
    mixed_block_warps,
    mm,
    pow2,
    segment_program,
    segment_start,
    work_dtype,
)
from .gla import gla_bwd_intra, gla_prep

Tensor = torch.Tensor
NEG_INF = tl.constexpr(float("-inf"))


# ---------------------------------------------------------------------------------------------- helpers
@triton.jit
def _decay_matrix(b_g, BT: tl.constexpr):
    """``[BT, BT]``: ``exp(sum_{j < r <= i} g_r)`` for ``j <= i``, 0 above. The exponent is summed
    over the segment itself (not a difference of prefix sums), so it keeps full relative precision."""
    o = tl.arange(0, BT)
    b_s = tl.cumsum(tl.where(o[:, None] > o[None, :], b_g[:, None], 0.0), axis=0)
    return tl.exp(tl.where(o[:, None] >= o[None, :], b_s, NEG_INF))


@triton.jit
def _decay_matrix_t(b_g, BT: tl.constexpr):
    """The transpose of ``_decay_matrix``: ``[j, i]``, nonzero for ``i >= j``."""
    o = tl.arange(0, BT)
    b_s = tl.cumsum(tl.where(o[None, :] > o[:, None], b_g[None, :], 0.0), axis=1)
    return tl.exp(tl.where(o[None, :] >= o[:, None], b_s, NEG_INF))


@triton.jit
def _chunk_gates(g, dt, bos, boh, i_t, L, i_h, o_k, H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr,
                 GATE: tl.constexpr, HAS_DT: tl.constexpr):
    """The gates of chunk ``i_t`` of a segment (first token ``bos``, first global chunk ``boh``), as
    stored: GATE 1 the log decays ``[BT]`` (0 outside the segment), GATE 2 the chunk decay ``gC``
    ``[BK]`` (1 outside), else zeros; dt ``[BT]`` or zeros. The state passes load them one chunk ahead:
    they feed no ``tl.dot``, so Triton's pipeliner would leave each load's latency in the sequential
    loop (sm_90 SASS: synchronous ``LDG`` between the loop's barriers)."""
    o_t = i_t * BT + tl.arange(0, BT)
    m_t = (o_t >= 0) & (o_t < L)
    tok = bos + o_t
    if GATE == 2:
        m_c = (o_k < K) & ((i_t + 0 * o_k) >= 0) & ((i_t * BT + 0 * o_k) < L)
        b_g = tl.load(g + ((boh + i_t) * H + i_h) * K + o_k, mask=m_c, other=1.0)
    elif GATE == 1:
        b_g = tl.load(g + tok * H + i_h, mask=m_t, other=0.0)
    else:
        b_g = tl.zeros([BT], dtype=tl.float32)
    if HAS_DT:
        b_dt = tl.load(dt + tok * H + i_h, mask=m_t, other=0.0)
    else:
        b_dt = tl.zeros([BT], dtype=tl.float32)
    return b_g, b_dt


# ---------------------------------------------------------------------------------------------- forward
@triton.jit
def _fwd_h_kernel(k, v, g, dt, h, h0, ht, cu, chunk_offsets, order,
                  H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                  BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr, HAS_DT: tl.constexpr,
                  USE_H0: tl.constexpr, STORE_HT: tl.constexpr,
                  WT: tl.constexpr, INTERP: tl.constexpr, PREC: tl.constexpr):
    """Carry the state through one segment's chunks; store the state before each chunk in ``h``.
    GATE 2 (gla) takes its keys decayed to the chunk end (``kg``) and ``g`` = the chunk decays ``gC``."""
    NV = tl.cdiv(V, BV)
    i_n, i_h, i_kv = segment_program(order, H, tl.cdiv(K, BK) * NV)
    i_nh, i_k, i_v = i_n * H + i_h, i_kv // NV, i_kv % NV
    bos, L, boh = segment_start(cu, chunk_offsets, i_n)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_kv = (o_k[:, None] < K) & (o_v[None, :] < V)
    p_kv = o_k[:, None] * V + o_v[None, :]
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        b_h += tl.load(h0 + i_nh.to(tl.int64) * K * V + p_kv, mask=m_kv, other=0.0).to(tl.float32)
    nx_g, nx_dt = _chunk_gates(g, dt, bos, boh, 0, L, i_h, o_k, H, K, BT, GATE, HAS_DT)
    for i_t in range(0, tl.cdiv(L, BT)):
        b_g, b_dt = nx_g.to(tl.float32), nx_dt.to(tl.float32)
        nx_g, nx_dt = _chunk_gates(g, dt, bos, boh, i_t + 1, L, i_h, o_k, H, K, BT, GATE, HAS_DT)
        tl.store(h + ((boh + i_t) * H + i_h) * K * V + p_kv, b_h.to(h.dtype.element_ty), mask=m_kv)
        o_t = i_t * BT + tl.arange(0, BT)
        m_t = o_t < L
        tok = bos + o_t
        m_kt = (o_k[:, None] < K) & m_t[None, :]
        b_kT = tl.load(k + tok[None, :] * H * K + i_h * K + o_k[:, None], mask=m_kt, other=0.0)
        b_v = tl.load(v + tok[:, None] * H * V + i_h * V + o_v[None, :], mask=m_t[:, None] & (o_v[None, :] < V),
                      other=0.0)
        if GATE == 2:
            b_h *= b_g[:, None]
        else:
            b_kT = b_kT.to(tl.float32)
        if GATE == 1:
            b_h *= tl.exp(tl.sum(b_g, axis=0))
            b_kT *= tl.exp(tl.cumsum(b_g, axis=0, reverse=True) - b_g)[None, :]
        if HAS_DT:
            b_kT *= b_dt[None, :]
        b_h += mm(b_kT, b_v, WT, INTERP, PREC)
    if STORE_HT:
        tl.store(ht + i_nh.to(tl.int64) * K * V + p_kv, b_h, mask=m_kv)


@triton.jit
def _fwd_o_kernel(q, k, v, g, dt, h, A, o, cu, chunk_indices, scale, sA,
                  H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, NA: tl.constexpr,
                  BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr, HAS_DT: tl.constexpr,
                  IT: tl.constexpr, WT: tl.constexpr, INTERP: tl.constexpr, PREC: tl.constexpr):
    """``o = scale * ((q ∘ gamma) h + (q k^T ∘ Γ ∘ M) v)`` per chunk; gla (GATE 2) takes ``q ∘ gamma``
    (``qg``) for q and reads the intra-chunk scores from ``A`` (on and below the diagonal; the sum of NA
    parts ``sA`` apart)."""
    i_t, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, L, _ = chunk_start(chunk_indices, cu, i_t, BT)
    o_t = tl.arange(0, BT)
    m_t = o_t < L
    tok = t0 + o_t
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    b_A = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_q = tl.load(q + tok[:, None] * H * K + i_h * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_h = tl.load(h + (i_t * H + i_h).to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :],
                      mask=m_k[:, None] & m_v[None, :], other=0.0)
        b_o += mm(b_q, b_h, WT, INTERP, PREC)
        if GATE != 2:
            b_kT = tl.load(k + tok[None, :] * H * K + i_h * K + o_k[:, None], mask=m_k[:, None] & m_t[None, :],
                           other=0.0)
            b_A += mm(b_q, b_kT, IT, INTERP, PREC)
    if GATE == 1:
        b_g = tl.load(g + tok * H + i_h, mask=m_t, other=0.0).to(tl.float32)
        b_o *= tl.exp(tl.cumsum(b_g, axis=0))[:, None]
        b_A *= _decay_matrix(b_g, BT)
    if GATE == 0:
        b_A = tl.where(o_t[:, None] >= o_t[None, :], b_A, 0.0)
    if GATE == 2:
        for i_a in tl.static_range(NA):
            b_A += tl.load(A + i_a * sA + tok[:, None] * H * BT + i_h * BT + o_t[None, :],
                           mask=m_t[:, None] & (o_t[:, None] >= o_t[None, :]), other=0.0)
    b_v = tl.load(v + tok[:, None] * H * V + i_h * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
    if HAS_DT:  # A diag(dt) v as A (dt v): dt scales v's rows, in the layout the row vectors already have
        b_v = b_v.to(tl.float32) * tl.load(dt + tok * H + i_h, mask=m_t, other=0.0).to(tl.float32)[:, None]
    b_o = (b_o + mm(b_A, b_v, WT, INTERP, PREC)) * scale
    tl.store(o + tok[:, None] * H * V + i_h * V + o_v[None, :], b_o.to(o.dtype.element_ty),
             mask=m_t[:, None] & m_v[None, :])


# ---------------------------------------------------------------------------------------------- backward
@triton.jit
def _bwd_dh_kernel(q, g, do, h, dh, dht, dh0, s_part, cu, chunk_offsets, order, scale, NTtot,
                   H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                   BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr,
                   USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
                   WT: tl.constexpr, INTERP: tl.constexpr, PREC: tl.constexpr):
    """Reverse state pass: ``dh`` of each chunk is the gradient of the state after it. For the decay
    gradient, partial sums (this block) of ``<dh_{c+1}, exp(G_C) h_c>``, the pairs spanning the chunk.
    GATE 2 (gla) takes ``q ∘ gamma`` (``qg``) for q and the chunk decays ``gC`` for g."""
    NV = tl.cdiv(V, BV)
    i_n, i_h, i_kv = segment_program(order, H, tl.cdiv(K, BK) * NV)
    i_nh, i_k, i_v = i_n * H + i_h, i_kv // NV, i_kv % NV
    bos, L, boh = segment_start(cu, chunk_offsets, i_n)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_kv = (o_k[:, None] < K) & (o_v[None, :] < V)
    p_kv = o_k[:, None] * V + o_v[None, :]
    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        b_dh += tl.load(dht + i_nh.to(tl.int64) * K * V + p_kv, mask=m_kv, other=0.0).to(tl.float32)
    NT = tl.cdiv(L, BT)
    nx_g, _ = _chunk_gates(g, None, bos, boh, NT - 1, L, i_h, o_k, H, K, BT, GATE, False)
    if GATE != 0:  # the chunk states too are loaded one chunk ahead
        nx_hc = tl.load(h + ((boh + NT - 1) * H + i_h) * K * V + p_kv, mask=m_kv & ((NT - 1 + 0 * p_kv) >= 0),
                        other=0.0)
    for ii in range(0, NT):
        i_t = NT - 1 - ii
        b_g = nx_g.to(tl.float32)
        nx_g, _ = _chunk_gates(g, None, bos, boh, i_t - 1, L, i_h, o_k, H, K, BT, GATE, False)
        if GATE != 0:
            b_hc = nx_hc.to(tl.float32)
            nx_hc = tl.load(h + ((boh + i_t - 1) * H + i_h) * K * V + p_kv,
                            mask=m_kv & ((i_t - 1 + 0 * p_kv) >= 0), other=0.0)
        tl.store(dh + ((boh + i_t) * H + i_h) * K * V + p_kv, b_dh.to(dh.dtype.element_ty), mask=m_kv)
        o_t = i_t * BT + tl.arange(0, BT)
        m_t = o_t < L
        tok = bos + o_t
        m_kt = (o_k[:, None] < K) & m_t[None, :]
        b_qT = tl.load(q + tok[None, :] * H * K + i_h * K + o_k[:, None], mask=m_kt, other=0.0)
        b_do = tl.load(do + tok[:, None] * H * V + i_h * V + o_v[None, :], mask=m_t[:, None] & (o_v[None, :] < V),
                       other=0.0)
        i_c = boh + i_t
        if GATE != 2:
            b_qT = b_qT.to(tl.float32)
        if GATE == 1:
            b_dh *= tl.exp(tl.sum(b_g, axis=0))
            b_qT *= tl.exp(tl.cumsum(b_g, axis=0))[None, :]
            tl.store(s_part + ((i_k * NV + i_v) * NTtot + i_c) * H + i_h,
                     tl.sum(tl.sum(b_dh * b_hc, axis=1), axis=0))
        if GATE == 2:
            b_dh *= b_g[:, None]
            tl.store(s_part + ((i_v * NTtot + i_c) * H + i_h) * K + o_k, tl.sum(b_dh * b_hc, axis=1), mask=o_k < K)
        b_dh += scale * mm(b_qT, b_do, WT, INTERP, PREC)
    if STORE_DH0:
        tl.store(dh0 + i_nh.to(tl.int64) * K * V + p_kv, b_dh, mask=m_kv)


@triton.jit
def _bwd_dv_kernel(q, k, g, dt, A, do, dh, dv, qk, cu, chunk_indices, scale, sA,
                   H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, NA: tl.constexpr,
                   BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr, HAS_DT: tl.constexpr,
                   USE_DH: tl.constexpr, NO_DIAG: tl.constexpr,
                   IT: tl.constexpr, WT: tl.constexpr, INTERP: tl.constexpr, PREC: tl.constexpr):
    """``dv = scale (A ∘ Γ ∘ M)^T do`` (+ ``(k ∘ decay to chunk end) dh`` with USE_DH; without the
    diagonal of A with NO_DIAG: the delta family adds it later, apart, for its decay gradient, and
    stores that diagonal ``q_t . k_t`` in ``qk [Ttot, H]`` (float32) instead). GATE 2 (gla) takes
    ``k ∘ exp(G_C - G)`` (``kg``) for k and reads the scores from ``A`` (NA parts).

    One program per chunk and head: the scores are formed once, then every value block of BV columns
    is written in turn (a program per value block would form them V / BV times)."""
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    t0, L, _ = chunk_start(chunk_indices, cu, i_t, BT)
    o_t = tl.arange(0, BT)
    m_t = o_t < L
    tok = t0 + o_t
    b_AT = tl.zeros([BT, BT], dtype=tl.float32)
    if GATE != 2:
        b_AT = chunk_gram(k, q, tok, i_h, m_t, H, K, BT, BK, IT, INTERP, PREC)
    if NO_DIAG:
        diag = o_t[:, None] == o_t[None, :]
        tl.store(qk + tok * H + i_h, tl.sum(tl.where(diag, b_AT, 0.0), axis=1), mask=m_t)
        b_AT = tl.where(diag, 0.0, b_AT)
    if GATE == 1:
        b_g = tl.load(g + tok * H + i_h, mask=m_t, other=0.0).to(tl.float32)
        b_AT *= _decay_matrix_t(b_g, BT)
        b_kdec = tl.exp(tl.cumsum(b_g, axis=0, reverse=True) - b_g)
    if GATE == 0:
        b_AT = tl.where(o_t[:, None] <= o_t[None, :], b_AT, 0.0)
    if GATE == 2:
        for i_a in tl.static_range(NA):
            b_AT += tl.load(A + i_a * sA + tok[None, :] * H * BT + i_h * BT + o_t[:, None],
                            mask=m_t[None, :] & (o_t[:, None] <= o_t[None, :]), other=0.0)
    if HAS_DT:
        b_dt = tl.load(dt + tok * H + i_h, mask=m_t, other=0.0).to(tl.float32)
        b_AT *= b_dt[:, None]
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v[None, :] < V)
        b_dv = tl.zeros([BT, BV], dtype=tl.float32)
        if USE_DH:
            for i_k in range(0, tl.cdiv(K, BK)):
                o_k = i_k * BK + tl.arange(0, BK)
                m_k = o_k < K
                b_k = tl.load(k + tok[:, None] * H * K + i_h * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :],
                              other=0.0)
                b_dh = tl.load(dh + (i_t * H + i_h).to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :],
                               mask=m_k[:, None] & (o_v[None, :] < V), other=0.0)
                b_dv += mm(b_k, b_dh, WT, INTERP, PREC)
            if GATE == 1:
                b_dv *= b_kdec[:, None]
            if HAS_DT:
                b_dv *= b_dt[:, None]
        p_v = tok[:, None] * H * V + i_h * V + o_v[None, :]
        b_dv += scale * mm(b_AT, tl.load(do + p_v, mask=m_tv, other=0.0), WT, INTERP, PREC)
        tl.store(dv + p_v, b_dv.to(dv.dtype.element_ty), mask=m_tv)


@triton.jit
def _bwd_dqk_kernel(q, k, v, g, dt, h, do, dh, dq, dk, dA, a_part, b_part, ddt_part, cu, chunk_indices, scale, Ttot,
                    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                    BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr, HAS_DT: tl.constexpr,
                    IT: tl.constexpr, WT: tl.constexpr, INTERP: tl.constexpr, PREC: tl.constexpr):
    """dq and dk of one chunk and key block. dk is built transposed ``[BK, BT]`` (from loads, never
    by transposing a matmul result). GATE 2 stores only the inter-chunk parts and ``dA``; the
    intra-chunk parts follow in ``_gla_bwd_intra_kernel``. GATE 1 also stores the per-token parts
    (this key block) of the decay gradient (``_chunk_dg_kernel``) and of ddt."""
    i_t, i_h, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, L, _ = chunk_start(chunk_indices, cu, i_t, BT)
    o_t = tl.arange(0, BT)
    m_t = o_t < L
    tok = t0 + o_t
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    m_tk = m_t[:, None] & m_k[None, :]
    m_kt = m_k[:, None] & m_t[None, :]
    p_h = (i_t * H + i_h).to(tl.int64) * K * V
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dkT = tl.zeros([BK, BT], dtype=tl.float32)
    b_dA = tl.zeros([BT, BT], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        b_do = tl.load(do + tok[:, None] * H * V + i_h * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :],
                       other=0.0)
        b_vT = tl.load(v + tok[None, :] * H * V + i_h * V + o_v[:, None], mask=m_v[:, None] & m_t[None, :],
                       other=0.0)
        b_hT = tl.load(h + p_h + o_k[None, :] * V + o_v[:, None], mask=m_v[:, None] & m_k[None, :], other=0.0)
        b_dh = tl.load(dh + p_h + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0.0)
        b_dA += mm(b_do, b_vT, IT, INTERP, PREC)
        b_dq += mm(b_do, b_hT, WT, INTERP, PREC)
        b_dkT += mm(b_dh, b_vT, WT, INTERP, PREC)
    b_dA = b_dA * scale
    b_dq = b_dq * scale
    if GATE == 2:
        b_g = tl.load(g + tok[:, None] * H * K + i_h * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
        b_gT = tl.load(g + tok[None, :] * H * K + i_h * K + o_k[:, None], mask=m_kt, other=0.0).to(tl.float32)
        b_dq *= tl.exp(tl.cumsum(b_g, axis=0))
        b_dkT *= tl.exp(tl.cumsum(b_gT, axis=1, reverse=True) - b_gT)
        if i_k == 0:
            b_dA = tl.where(o_t[:, None] >= o_t[None, :], b_dA, 0.0)
            tl.store(dA + tok[:, None] * H * BT + i_h * BT + o_t[None, :], b_dA, mask=m_t[:, None])
        tl.store(dq + tok[:, None] * H * K + i_h * K + o_k[None, :], b_dq, mask=m_tk)
        tl.store(dk + tok[None, :] * H * K + i_h * K + o_k[:, None], b_dkT, mask=m_kt)
    else:
        if GATE == 1:
            b_g = tl.load(g + tok * H + i_h, mask=m_t, other=0.0).to(tl.float32)
            b_dq *= tl.exp(tl.cumsum(b_g, axis=0))[:, None]
            b_dkT *= tl.exp(tl.cumsum(b_g, axis=0, reverse=True) - b_g)[None, :]
            b_dA *= _decay_matrix(b_g, BT)
        else:
            b_dA = tl.where(o_t[:, None] >= o_t[None, :], b_dA, 0.0)
        b_k = tl.load(k + tok[:, None] * H * K + i_h * K + o_k[None, :], mask=m_tk, other=0.0)
        b_qT = tl.load(q + tok[None, :] * H * K + i_h * K + o_k[:, None], mask=m_kt, other=0.0)
        b_kT = tl.load(k + tok[None, :] * H * K + i_h * K + o_k[:, None], mask=m_kt, other=0.0).to(tl.float32)
        if HAS_DT:
            b_dt = tl.load(dt + tok * H + i_h, mask=m_t, other=0.0).to(tl.float32)
        p_part = (i_k * Ttot + tok) * H + i_h
        if GATE == 1:
            # decay gradient parts (README, "gate gradients"): a = q . dq_inter plus the row minus the
            # column sums of dA ∘ A off the diagonal (a token's pairing with itself cancels exactly and
            # is left out); b = k' . dk'_inter, the keys' pairings with everything after the chunk
            b_q = tl.load(q + tok[:, None] * H * K + i_h * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
            b_P = b_dA * mm(b_q, b_kT, IT, INTERP, PREC)
            b_sk = tl.sum(b_kT * b_dkT, axis=0)
            if HAS_DT:
                b_P *= b_dt[None, :]
                b_sk *= b_dt
            b_P = tl.where(o_t[:, None] > o_t[None, :], b_P, 0.0)
            tl.store(a_part + p_part, tl.sum(b_q * b_dq, axis=1) + tl.sum(b_P, axis=1) - tl.sum(b_P, axis=0),
                     mask=m_t)
            tl.store(b_part + p_part, b_sk, mask=m_t)
        b_dkT += mm(b_qT, b_dA, WT, INTERP, PREC)  # gradient of the (dt-scaled) key
        if HAS_DT:
            b_dq += mm((b_dA * b_dt[None, :]), b_k, WT, INTERP, PREC)
            tl.store(ddt_part + p_part, tl.sum(b_kT * b_dkT, axis=0), mask=m_t)  # k . dk'
        else:
            b_dq += mm(b_dA, b_k, WT, INTERP, PREC)
        if HAS_DT:
            b_dkT *= b_dt[None, :]
        tl.store(dq + tok[:, None] * H * K + i_h * K + o_k[None, :], b_dq.to(dq.dtype.element_ty), mask=m_tk)
        tl.store(dk + tok[None, :] * H * K + i_h * K + o_k[:, None], b_dkT.to(dk.dtype.element_ty), mask=m_kt)


@triton.jit
def _chunk_dg_kernel(a, b, s, out, cu, chunk_indices, Ttot, NTtot,
                     H: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
                     NA: tl.constexpr, NB: tl.constexpr, NS: tl.constexpr, PREC: tl.constexpr):
    """The log-decay gradient of one chunk from its parts (README, "gate gradients")::

        dg_t = sum_{i >= t} a_i + sum_{j < t} b_j + s

    a, b ``[NA | NB, Ttot, H, D]`` (parts summed), s ``[NS, NT, H, D]`` per chunk; D = 1 per-head."""
    i_t, i_h, i_d = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, L, _ = chunk_start(chunk_indices, cu, i_t, BT)
    o_t = tl.arange(0, BT)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    m = (o_t < L)[:, None] & m_d[None, :]
    p = ((t0 + o_t) * H + i_h)[:, None] * D + o_d[None, :]
    b_a = tl.zeros([BT, BD], dtype=tl.float32)
    b_b = tl.zeros([BT, BD], dtype=tl.float32)
    b_s = tl.zeros([BD], dtype=tl.float32)
    for i_p in tl.static_range(NA):
        b_a += tl.load(a + i_p * Ttot * H * D + p, mask=m, other=0.0)
    for i_p in tl.static_range(NB):
        b_b += tl.load(b + i_p * Ttot * H * D + p, mask=m, other=0.0)
    for i_p in tl.static_range(NS):
        b_s += tl.load(s + ((i_p * NTtot + i_t) * H + i_h) * D + o_d, mask=m_d, other=0.0)
    b_dg = tl.cumsum(b_a, axis=0, reverse=True) + b_s[None, :]
    if BD == 1:
        b_dg += tl.sum(tl.where(o_t[None, :] < o_t[:, None], tl.sum(b_b, axis=1)[None, :], 0.0), axis=1)[:, None]
    else:
        b_dg += tl.dot(tl.where(o_t[:, None] > o_t[None, :], 1.0, 0.0), b_b, input_precision=PREC)
    tl.store(out + p, b_dg.to(out.dtype.element_ty), mask=m)


# ---------------------------------------------------------------------------------------------- launchers
def _state_blocks(K: int, V: int) -> tuple[int, int]:
    return min(64, pow2(K)), min(64, pow2(V))


def fwd_h(k, v, g, dt, gate, h0, output_final_state, meta, in_dtype=None):
    """Chunk states ``h [NT, H, K, V]`` (before each chunk) and the final states (or None). ``in_dtype``:
    the inputs' dtype where k is an intermediate (gla's ``kg``)."""
    _, H, K = k.shape
    V = v.shape[-1]
    N = meta.num_segments
    in_dtype = in_dtype or k.dtype
    wdt = work_dtype(in_dtype)
    BK, BV = _state_blocks(K, V)
    h = k.new_empty(meta.num_chunks, H, K, V, dtype=wdt)
    ht = k.new_empty(N, H, K, V, dtype=torch.float32) if output_final_state else None
    grid = (N * H * triton.cdiv(K, BK) * triton.cdiv(V, BV),)
    _fwd_h_kernel[grid](k, v, g, dt, h, h0, ht, meta.cu, meta.chunk_offsets, meta.order, H=H, K=K, V=V, BT=CHUNK,
                        BK=BK, BV=BV, GATE=gate, HAS_DT=dt is not None, USE_H0=h0 is not None,
                        STORE_HT=output_final_state,
                        **dots(in_dtype, False), **launch("gl.fwd_h", num_warps=8 if gate == 1 else 4))
    return h, ht


def _a_parts(A: Tensor | None) -> dict:
    """gla's scores ``A [NA, Ttot, H, C]``: the parts' stride and number; no parts otherwise."""
    return {"sA": 0, "NA": 0} if A is None else {"sA": A.stride(0), "NA": A.shape[0]}


def _value_block(V: int) -> int:
    """The output kernel's value block: 128 wide, so that each program reads q, k and the scores once for more
    of V (H200, gla at the benchmark shape with 4 parts of A: 146 -> 91 us; gated_deltanet at B4 T2048 H4
    K = V = 256: 66 -> 55 us, benchmarks/results/tune_fwd_o_h200_b23513f.txt; the GPU tests passed with 128-wide
    blocks at every width, gpu_tests_fwdo128_h200_b23513f.txt)."""
    return min(128, pow2(V))


def fwd_o(q, k, v, g, dt, h, A, gate, scale, meta, out_dtype, in_dtype=None, out=None):
    """The outputs ``[Ttot, H, V]`` (into ``out`` where given)."""
    Ttot, H, K = q.shape
    V = v.shape[-1]
    opts = launch("gl.fwd_o", BV=_value_block(V), BK=min(64, pow2(K)))
    opts = mixed_block_warps("gl.fwd_o", opts, q.device, opts["BV"] < opts["BK"])
    o = q.new_empty(Ttot, H, V, dtype=out_dtype) if out is None else out
    grid = (meta.num_chunks, H, triton.cdiv(V, opts["BV"]))
    _fwd_o_kernel[grid](q, k, v, g, dt, h, A, o, meta.cu, meta.chunk_indices, scale, **_a_parts(A), H=H, K=K, V=V,
                        BT=CHUNK, GATE=gate, HAS_DT=dt is not None, **dots(in_dtype or q.dtype), **opts)
    return o


def bwd_dh(q, g, do, h, dht, gate, scale, need_dh0, meta, K, V, wdt, in_dtype=None):
    """Chunk-end state gradients ``dh``, the initial state's gradient and the decay gradient's
    per-chunk parts ``s`` (gate 1: ``[NK * NV, NT, H, 1]``, gate 2: ``[NV, NT, H, K]``)."""
    H = q.shape[1]
    N, NT = meta.num_segments, meta.num_chunks
    BK, BV = _state_blocks(K, V)
    NK, NV = triton.cdiv(K, BK), triton.cdiv(V, BV)
    dh = q.new_empty(NT, H, K, V, dtype=wdt)
    dh0 = q.new_empty(N, H, K, V, dtype=torch.float32) if need_dh0 else None
    s = {0: None, 1: q.new_zeros(NK * NV, NT, H, 1, dtype=torch.float32),
         2: q.new_zeros(NV, NT, H, K, dtype=torch.float32)}[gate]
    _bwd_dh_kernel[(N * H * NK * NV,)](q, g, do, h, dh, dht, dh0, s, meta.cu, meta.chunk_offsets, meta.order, scale, NT,
                                       H=H, K=K, V=V, BT=CHUNK, BK=BK, BV=BV, GATE=gate, USE_DHT=dht is not None,
                                       STORE_DH0=need_dh0, **dots(in_dtype or q.dtype, False), **launch("gl.bwd_dh"))
    return dh, dh0, s


def bwd_dv(q, k, g, dt, A, do, dh, gate, scale, meta, out_dtype, V, no_diag=False):
    """``dv``; with ``no_diag``, ``(dv, qk)``: the scores' diagonal ``q_t . k_t [Ttot, H]`` (float32) left
    out of dv."""
    Ttot, H, K = q.shape
    opts = launch("gl.bwd_dv", BV=min(64, pow2(V)), BK=min(64, pow2(K)))
    opts = mixed_block_warps("gl.bwd_dv", opts, q.device, opts["BV"] < opts["BK"])
    dv = q.new_empty(Ttot, H, V, dtype=out_dtype)
    qk = q.new_empty(Ttot, H, dtype=torch.float32) if no_diag else None
    _bwd_dv_kernel[(meta.num_chunks, H)](q, k, g, dt, A, do, dh, dv, qk, meta.cu, meta.chunk_indices, scale,
                                         **_a_parts(A), H=H, K=K, V=V, BT=CHUNK, GATE=gate,
                                         HAS_DT=dt is not None, USE_DH=dh is not None, NO_DIAG=no_diag,
                                         **dots(q.dtype), **opts)
    return (dv, qk) if no_diag else dv


def chunk_dg(a: Tensor, b: Tensor, s: Tensor | None, meta, out_dtype, prec: str, out: Tensor | None = None) -> Tensor:
    """The log-decay gradient ``[Ttot, H, D]`` from its parts: a, b ``[P, Ttot, H, D]``, s ``[P, NT, H, D]``
    (into ``out`` where given)."""
    _, Ttot, H, D = a.shape
    BD = 1 if D == 1 else min(64, pow2(D))
    out = a.new_empty(Ttot, H, D, dtype=out_dtype) if out is None else out
    _chunk_dg_kernel[(meta.num_chunks, H, triton.cdiv(D, BD))](
        a, b, s, out, meta.cu, meta.chunk_indices, Ttot, meta.num_chunks, H=H, D=D, BT=CHUNK, BD=BD,
        NA=a.shape[0], NB=b.shape[0], NS=0 if s is None else s.shape[0], PREC=prec, **launch("gl.chunk_dg"))
    return out


# ---------------------------------------------------------------------------------------------- autograd
class GatedLinearChunk(torch.autograd.Function):
    """``(o, final_state)`` of the gated linear family on packed input ``[Ttot, H, *]``."""

    @staticmethod
    def forward(ctx, q, k, v, g, dt, h0, scale, gate, output_final_state, meta):
        if gate == 2:  # gla: the decays enter through A, qg, kg, gC (gla.py), kept for the backward
            A, qg, kg, gC = gla_prep(q, k, g, meta)
            h, ht = fwd_h(kg, v, gC, None, gate, h0, output_final_state, meta, in_dtype=q.dtype)
            o = fwd_o(qg, k, v, None, None, h, A, gate, scale, meta, v.dtype, in_dtype=q.dtype)
            ctx.save_for_backward(q, k, v, g, dt, h0, A, qg, kg, gC)
        else:
            h, ht = fwd_h(k, v, g, dt, gate, h0, output_final_state, meta)
            o = fwd_o(q, k, v, g, dt, h, None, gate, scale, meta, v.dtype)
            ctx.save_for_backward(q, k, v, g, dt, h0)
        ctx.scale, ctx.gate, ctx.meta = scale, gate, meta
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        scale, gate, meta = ctx.scale, ctx.gate, ctx.meta
        q, k, v, g, dt, h0 = ctx.saved_tensors[:6]
        Ttot, H, K = q.shape
        V = v.shape[-1]
        do = do.contiguous()
        dht = contiguous(dht)
        wdt = work_dtype(q.dtype)
        if gate == 2:
            A, qg, kg, gC = ctx.saved_tensors[6:]
            h, _ = fwd_h(kg, v, gC, None, gate, h0, False, meta, in_dtype=q.dtype)
            dh, dh0, s = bwd_dh(qg, gC, do, h, dht, gate, scale, h0 is not None, meta, K, V, wdt, in_dtype=q.dtype)
            dv = bwd_dv(q, kg, None, dt, A, do, dh, gate, scale, meta, v.dtype, V)
        else:
            h, _ = fwd_h(k, v, g, dt, gate, h0, False, meta)
            dh, dh0, s = bwd_dh(q, g, do, h, dht, gate, scale, h0 is not None, meta, K, V, wdt)
            dv = bwd_dv(q, k, g, dt, None, do, dh, gate, scale, meta, v.dtype, V)

        BK, BV = min(64, pow2(K)), min(64, pow2(V))
        NK = triton.cdiv(K, BK)
        f32 = torch.float32
        if gate == 2:
            dq_i, dk_i = q.new_empty(Ttot, H, K, dtype=f32), q.new_empty(Ttot, H, K, dtype=f32)
            dA = q.new_empty(Ttot, H, CHUNK, dtype=f32)
        else:
            dq_i, dk_i, dA = q.new_empty(q.shape), k.new_empty(k.shape), None
        a_part, b_part = (q.new_empty(NK, Ttot, H, dtype=f32) for _ in range(2)) if gate == 1 else (None, None)
        ddt_part = q.new_empty(NK, Ttot, H, dtype=f32) if dt is not None else None
        grid = (meta.num_chunks, H, NK)
        _bwd_dqk_kernel[grid](q, k, v, g, dt, h, do, dh, dq_i, dk_i, dA, a_part, b_part, ddt_part, meta.cu,
                              meta.chunk_indices, scale, Ttot, H=H, K=K, V=V, BT=CHUNK, BK=BK, BV=BV, GATE=gate,
                              HAS_DT=dt is not None, **dots(q.dtype), **launch("gl.bwd_dqk"))
        dg = ddt = None
        prec = dots(q.dtype)["PREC"]
        if gate == 2:
            dq, dk, a_tok, b_tok = gla_bwd_intra(q, k, g, dA, dq_i, dk_i, meta)
            dg = chunk_dg(a_tok[None], b_tok[None], s, meta, g.dtype, prec)
        else:
            dq, dk = dq_i, dk_i
            if gate == 1:
                dg = chunk_dg(a_part[..., None], b_part[..., None], s, meta, g.dtype, prec)[..., 0]
        if dt is not None:
            ddt = ddt_part.sum(0).to(dt.dtype)
        return dq, dk, dv, dg, ddt, dh0, None, None, None, None


def chunk_gated_linear(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, dt: Tensor | None, *, gate: int,
                       scale: float, initial_state: Tensor | None, output_final_state: bool,
                       cu_seqlens: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """``S_t = Diag(exp g_t) S_{t-1} + (dt_t k_t) v_t^T``, ``o_t = scale S_t^T q_t``.

    q, k ``[B, T, H, K]``; v ``[B, T, H, V]``; g None (gate 0), ``[B, T, H]`` (gate 1) or ``[B, T, H, K]``
    (gate 2); dt None or ``[B, T, H]``; initial_state ``[N, H, K, V]``. Returns ``(o, final_state)``.
    """
    B, T, H, _ = q.shape
    V = v.shape[-1]
    meta = chunk_meta(B, T, cu_seqlens, CHUNK, q.device)

    def flat(x):
        return None if x is None else x.reshape(B * T, *x.shape[2:]).contiguous()

    h0 = contiguous(initial_state)
    o, ht = GatedLinearChunk.apply(flat(q), flat(k), flat(v), flat(g), flat(dt), h0, float(scale), gate,
                                   bool(output_final_state), meta)
    return o.view(B, T, H, V), ht
