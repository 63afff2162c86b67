"""gla's per-channel decay inside a chunk (``GATE == 2`` of ``chunk.py``).

``gla_prep`` computes, once per forward, everything of a chunk that depends on the decays: the
intra-chunk scores ``A``, the decayed queries ``q ∘ exp(G)`` and keys ``k ∘ exp(G_C - G)`` and the
chunk decays ``exp(G_C)``. The state passes and the output kernel then run on these with no decay
arithmetic of their own, and the backward reuses them. ``gla_bwd_intra`` adds the intra-chunk parts of
dq and dk. Both work on sub-chunks of ``BC`` rows; derivation in ``README.md`` ("per-channel decay").
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import CHUNK, chunk_start, dots, launch, mm, pow2, select_rows, work_dtype

Tensor = torch.Tensor
SUB = 16  # rows per sub-chunk (BC)


@triton.jit
def _level(b_g, lv, BC: tl.constexpr, PARTS: tl.constexpr, INTERP: tl.constexpr):
    """Level ``lv`` of the diagonal sub-chunk (README, "per-channel decay"): the pairs ``j < i`` whose
    row indices first differ in bit ``lv``. With blocks of ``2^lv`` rows, query i lies in an odd block
    and key j in the even block before it; their decay passes the row between the two blocks.
    Returns ``(Y, m_q, m_pair)``: ``Y`` ``[BC, BK]`` the log decay from a query's block start to it
    (inclusive) on query rows, and from after a key to its block end on key rows, each summed exactly
    over its own range (``select_rows``); ``m_q`` the query rows; ``m_pair`` ``[BC, BC]`` the pairs
    of rows in the same two blocks."""
    o = tl.arange(0, BC)
    m_q = ((o >> lv) & 1) == 1
    same = (o[:, None] >> lv) == (o[None, :] >> lv)
    inside = tl.where(m_q[:, None], o[None, :] <= o[:, None], o[None, :] > o[:, None])
    b_Y = select_rows(same & inside, b_g, INTERP, PARTS)
    return b_Y, m_q, (o[:, None] >> (lv + 1)) == (o[None, :] >> (lv + 1))


@triton.jit
def _sub_sums(b_g, BC: tl.constexpr, PARTS: tl.constexpr, INTERP: tl.constexpr):
    """``(P, X)`` of a sub-chunk's log decays ``[BC, BK]``: ``P_i = sum_{r <= i} g_r`` (from the
    sub-chunk start, inclusive), ``X_i = sum_{r > i} g_r`` (to its end), exact sums on tensor cores."""
    o = tl.arange(0, BC)
    return (select_rows(o[None, :] <= o[:, None], b_g, INTERP, PARTS),
            select_rows(o[None, :] > o[:, None], b_g, INTERP, PARTS))


@triton.jit
def _sub_chunk(cu, chunk_indices, H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
               BK: tl.constexpr):
    """This program's sub-chunk of BC rows and key block (grid: chunks x sub-chunks, heads, key blocks):
    chunk, sub-chunk, head, key block, the chunk's first token, the tokens from there to the segment
    end, the sub-chunk's rows (from 0, from the chunk start, mask), key offsets and mask,
    and the offsets of its ``[BC, BK]`` tile in a ``[Ttot, H, K]`` tensor."""
    NC: tl.constexpr = BT // BC
    i_tc, i_h, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_t, i_c = i_tc // NC, i_tc % NC
    t0, L, _ = chunk_start(chunk_indices, cu, i_t, BT)
    s = i_c * BC
    o_r = tl.arange(0, BC)
    o_i = s + o_r
    o_k = i_k * BK + tl.arange(0, BK)
    p_i = (t0 + o_i)[:, None] * H * K + i_h * K + o_k[None, :]
    return i_t, i_c, i_h, i_k, t0, L, o_r, o_i, o_i < L, o_k, o_k < K, p_i


@triton.jit
def _gla_prep_kernel(q, k, g, A, qg, kg, gC, cu, chunk_indices, Ttot,
                     H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                     LOG_BC: tl.constexpr, PARTS: tl.constexpr,
                     WT: tl.constexpr, INTERP: tl.constexpr, PREC: tl.constexpr):
    """One sub-chunk of BC rows and one key block. Stores this block's part of the sub-chunk's rows of
    ``A`` (``A [NK, Ttot, H, BT]``, summed by the readers) below and on the diagonal (above it nothing:
    readers mask), its columns of ``qg = q ∘ exp(G)`` and ``kg = k ∘ exp(G_C - G)``, and (first
    sub-chunk) of the chunk decay ``gC = exp(G_C)``. Every exponent is a sum over its own range."""
    NC: tl.constexpr = BT // BC
    i_t, i_c, i_h, i_k, t0, L, o_r, o_i, m_i, o_k, m_k, p_i = _sub_chunk(cu, chunk_indices, H, K, BT, BC, BK)
    m_ik = m_i[:, None] & m_k[None, :]
    p_A = A + i_k * Ttot * H * BT + (t0 + o_i)[:, None] * H * BT + i_h * BT
    b_q = tl.load(q + p_i, mask=m_ik, other=0.0).to(tl.float32)
    b_k = tl.load(k + p_i, mask=m_ik, other=0.0).to(tl.float32)
    b_g = tl.load(g + p_i, mask=m_ik, other=0.0).to(tl.float32)
    b_P, b_X = _sub_sums(b_g, BC, PARTS, INTERP)
    b_qf = b_q * tl.exp(b_P)  # query i decays from the sub-chunk start
    # earlier sub-chunks b, nearest first: key j reaches s through exp(sum_{j < r < s} g_r), its own
    # sub-chunk's suffix plus b_D, the sum over the whole sub-chunks between b and this one
    # (unrolled: as an scf.for loop, Triton 3.6 on Hopper computed every block after the first wrongly
    # for float32 inputs with K >= 64 at most warp counts)
    b_D = tl.zeros([BK], dtype=tl.float32)
    for ib in tl.static_range(NC - 1):
        if ib < i_c:
            o_j = (i_c - 1 - ib) * BC + o_r
            p_j = (t0 + o_j)[:, None] * H * K + i_h * K + o_k[None, :]
            m_jk = (o_j < L)[:, None] & m_k[None, :]  # all rows, unless this sub-chunk lies past the segment end
            b_kj = tl.load(k + p_j, mask=m_jk, other=0.0).to(tl.float32)
            b_gj = tl.load(g + p_j, mask=m_jk, other=0.0).to(tl.float32)
            b_kf = b_kj * tl.exp(_sub_sums(b_gj, BC, PARTS, INTERP)[1] + b_D[None, :])
            tl.store(p_A + o_j[None, :], mm(b_qf, tl.trans(b_kf), WT, INTERP, PREC), mask=m_i[:, None])
            b_D += tl.sum(b_gj, axis=0)
    tl.store(qg + p_i, (b_q * tl.exp(b_P + b_D[None, :])).to(qg.dtype.element_ty), mask=m_ik)
    # later sub-chunks: the keys' decay to the chunk end
    b_D = tl.zeros([BK], dtype=tl.float32)
    for ia in tl.static_range(1, NC):
        if ia > i_c:
            o_a = ia * BC + o_r
            b_ga = tl.load(g + (t0 + o_a)[:, None] * H * K + i_h * K + o_k[None, :],
                           mask=(o_a < L)[:, None] & m_k[None, :], other=0.0).to(tl.float32)
            b_D += tl.sum(b_ga, axis=0)
    tl.store(kg + p_i, (b_k * tl.exp(b_X + b_D[None, :])).to(kg.dtype.element_ty), mask=m_ik)
    if i_c == 0:
        tl.store(gC + (i_t * H + i_h) * K + o_k, tl.exp(tl.sum(b_g, axis=0) + b_D), mask=m_k)
    # the diagonal sub-chunk: each token with itself, then one level per bit of the row index
    b_Ad = tl.where(o_r[:, None] == o_r[None, :], tl.sum(b_q * b_k, axis=1)[:, None], 0.0)
    for lv in tl.static_range(LOG_BC):
        b_Y, m_q, m_pair = _level(b_g, lv, BC, PARTS, INTERP)
        b_eY = tl.exp(b_Y)
        b_qf = tl.where(m_q[:, None], b_q * b_eY, 0.0)
        b_kf = tl.where(m_q[:, None], 0.0, b_k * b_eY)
        b_Ad += tl.where(m_pair, mm(b_qf, tl.trans(b_kf), WT, INTERP, PREC), 0.0)
    tl.store(p_A + o_i[None, :], b_Ad, mask=m_i[:, None])


@triton.jit
def _gla_bwd_intra_kernel(q, k, g, dA, dq_inter, dk_inter, dq, dk, a_tok, b_tok, cu, chunk_indices,
                          H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                          LOG_BC: tl.constexpr, PARTS: tl.constexpr,
                          WT: tl.constexpr, INTERP: tl.constexpr, PREC: tl.constexpr):
    """Add the intra-chunk parts of dq, dk for one sub-chunk of BC rows and one key block; store dq,
    dk and the per-token parts of the decay gradient (README, "gate gradients"). ``dA`` holds the
    score gradients on and below the diagonal."""
    NC: tl.constexpr = BT // BC
    _, i_c, i_h, _, t0, L, o_r, o_i, m_i, o_k, m_k, p_i = _sub_chunk(cu, chunk_indices, H, K, BT, BC, BK)
    m_ik = m_i[:, None] & m_k[None, :]
    p_A = (t0 + o_i) * H * BT + i_h * BT  # dA rows of this sub-chunk
    b_q = tl.load(q + p_i, mask=m_ik, other=0.0).to(tl.float32)
    b_k = tl.load(k + p_i, mask=m_ik, other=0.0).to(tl.float32)
    b_g = tl.load(g + p_i, mask=m_ik, other=0.0).to(tl.float32)
    # dq from keys of earlier sub-chunks (nearest first), through the sub-chunk start as in the forward
    b_dq = tl.zeros([BC, BK], dtype=tl.float32)
    b_D = tl.zeros([BK], dtype=tl.float32)
    for ib in tl.static_range(NC - 1):  # unrolled, as in the forward
        if ib < i_c:
            o_j = (i_c - 1 - ib) * BC + o_r
            p_j = (t0 + o_j)[:, None] * H * K + i_h * K + o_k[None, :]
            m_jk = (o_j < L)[:, None] & m_k[None, :]
            b_kj = tl.load(k + p_j, mask=m_jk, other=0.0).to(tl.float32)
            b_gj = tl.load(g + p_j, mask=m_jk, other=0.0).to(tl.float32)
            b_kf = b_kj * tl.exp(_sub_sums(b_gj, BC, PARTS, INTERP)[1] + b_D[None, :])
            b_dAb = tl.load(dA + p_A[:, None] + o_j[None, :], mask=m_i[:, None], other=0.0)
            b_dq += mm(b_dAb, b_kf, WT, INTERP, PREC)
            b_D += tl.sum(b_gj, axis=0)
    b_P, b_X = _sub_sums(b_g, BC, PARTS, INTERP)
    b_dq *= tl.exp(b_P)
    # dk from queries of later sub-chunks (nearest first), through the sub-chunk end
    b_dk = tl.zeros([BC, BK], dtype=tl.float32)
    b_D = tl.zeros([BK], dtype=tl.float32)
    for ia in tl.static_range(1, NC):
        if ia > i_c:
            o_a = ia * BC + o_r
            m_a = o_a < L
            p_a = (t0 + o_a)[:, None] * H * K + i_h * K + o_k[None, :]
            b_qa = tl.load(q + p_a, mask=m_a[:, None] & m_k[None, :], other=0.0).to(tl.float32)
            b_ga = tl.load(g + p_a, mask=m_a[:, None] & m_k[None, :], other=0.0).to(tl.float32)
            b_qf = b_qa * tl.exp(_sub_sums(b_ga, BC, PARTS, INTERP)[0] + b_D[None, :])
            b_dAT = tl.load(dA + ((t0 + o_a) * H * BT + i_h * BT)[None, :] + o_i[:, None],
                            mask=m_i[:, None] & m_a[None, :], other=0.0)
            b_dk += mm(b_dAT, b_qf, WT, INTERP, PREC)
            b_D += tl.sum(b_ga, axis=0)
    b_dk *= tl.exp(b_X)
    # the diagonal sub-chunk by levels (as in the forward), without each token's pairing with itself:
    # that pair cancels exactly in the decay gradient q ∘ dq - k ∘ dk, and summed in, it would swamp
    # small gradients. dA [i, j] and its transpose, loaded as such
    m_ii = m_i[:, None] & m_i[None, :]
    b_dAd = tl.load(dA + p_A[:, None] + o_i[None, :], mask=m_ii, other=0.0)
    b_dAdT = tl.load(dA + p_A[None, :] + o_i[:, None], mask=m_ii, other=0.0)
    for lv in tl.static_range(LOG_BC):
        b_Y, m_q, m_pair = _level(b_g, lv, BC, PARTS, INTERP)
        b_eY = tl.exp(b_Y)
        b_kf = tl.where(m_q[:, None], 0.0, b_k * b_eY)
        b_qf = tl.where(m_q[:, None], b_q * b_eY, 0.0)
        b_dq += tl.where(m_q[:, None], b_eY, 0.0) * mm(tl.where(m_pair, b_dAd, 0.0), b_kf, WT, INTERP, PREC)
        b_dk += tl.where(m_q[:, None], 0.0, b_eY) * mm(tl.where(m_pair, b_dAdT, 0.0), b_qf, WT, INTERP, PREC)
    # each token with itself
    b_dAd = tl.load(dA + p_A + o_i, mask=m_i, other=0.0)[:, None]
    b_dq += tl.load(dq_inter + p_i, mask=m_ik, other=0.0)
    b_dki = tl.load(dk_inter + p_i, mask=m_ik, other=0.0)
    tl.store(dq + p_i, (b_dq + b_dAd * b_k).to(dq.dtype.element_ty), mask=m_ik)
    tl.store(dk + p_i, (b_dk + b_dki + b_dAd * b_q).to(dk.dtype.element_ty), mask=m_ik)
    tl.store(a_tok + p_i, b_q * b_dq - b_k * b_dk, mask=m_ik)
    tl.store(b_tok + p_i, b_k * b_dki, mask=m_ik)


def _levels(g: Tensor) -> dict:
    """The diagonal sub-chunk's levels, and the bfloat16 parts of the log decays' exact sums."""
    return {"LOG_BC": SUB.bit_length() - 1, "PARTS": 1 if g.dtype == torch.bfloat16 else 3}


def gla_prep(q: Tensor, k: Tensor, g: Tensor, meta) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(A [NK, Ttot, H, C] float32 (summed over NK by the readers), qg, kg [Ttot, H, K] in the work
    dtype, gC [NT, H, K] float32)``."""
    Ttot, H, K = q.shape
    # one warp and 32-wide key blocks: the kernel is a chain of small products, each waiting on its
    # operands' trip through shared memory; smaller programs wait less (H200, benchmark shape, 64-wide
    # blocks: 347 us at one warp, 472 at two, 778 at four; 32-wide at one warp: 263 us). The readers of
    # A add its parts; with 128-wide value blocks they read them once (chunk.py, _value_block)
    opts = launch("gl.gla_prep", BK=min(32, pow2(K)), num_warps=1)
    NK = triton.cdiv(K, opts["BK"])
    wdt = work_dtype(q.dtype)
    A = q.new_empty(NK, Ttot, H, CHUNK, dtype=torch.float32)
    qg, kg = q.new_empty(q.shape, dtype=wdt), q.new_empty(q.shape, dtype=wdt)
    gC = q.new_empty(meta.num_chunks, H, K, dtype=torch.float32)
    grid = (meta.num_chunks * (CHUNK // SUB), H, NK)
    _gla_prep_kernel[grid](q, k, g, A, qg, kg, gC, meta.cu, meta.chunk_indices, Ttot, H=H, K=K, BT=CHUNK, BC=SUB,
                           **_levels(g), **dots(q.dtype, False), **opts)
    return A, qg, kg, gC


def gla_bwd_intra(q, k, g, dA, dq_inter, dk_inter, meta) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dq, dk, a_tok, b_tok)``: the gradients and the decay gradient's per-token parts."""
    Ttot, H, K = q.shape
    # two warps (H200: 436 us; 455 at four, 761 at one)
    opts = launch("gl.gla_bwd_intra", BK=min(64, pow2(K)), num_warps=2)
    dq, dk = q.new_empty(q.shape), k.new_empty(k.shape)
    a_tok, b_tok = (q.new_empty(Ttot, H, K, dtype=torch.float32) for _ in range(2))
    grid = (meta.num_chunks * (CHUNK // SUB), H, triton.cdiv(K, opts["BK"]))
    _gla_bwd_intra_kernel[grid](q, k, g, dA, dq_inter, dk_inter, dq, dk, a_tok, b_tok, meta.cu, meta.chunk_indices,
                                H=H, K=K, BT=CHUNK, BC=SUB, **_levels(g), **dots(q.dtype, False), **opts)
    return dq, dk, a_tok, b_tok
