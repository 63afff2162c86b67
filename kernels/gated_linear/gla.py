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

from .._common import CHUNK, chunk_start, dots, launch, mm, pow2, work_dtype

Tensor = torch.Tensor
SUB = 16  # rows per sub-chunk (BC)


@triton.jit
def _row(x, t0, r, L, i_h, o_k, H: tl.constexpr, K: tl.constexpr):
    """Row ``r`` of the chunk starting at token ``t0`` (``[BK]``, 0 outside ``0 <= r < L``). The
    token loops load their next row with this while working on the current one."""
    r_k = r + 0 * o_k  # a vector test: a scalar one gives an int mask, which the Triton 3.9 interpreter rejects
    return tl.load(x + (t0 + r) * H * K + i_h * K + o_k, mask=(o_k < K) & (r_k >= 0) & (r_k < L), other=0.0)


@triton.jit
def _gla_prep_kernel(q, k, g, A, qg, kg, gC, cu, chunk_indices,
                     H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                     WT: tl.constexpr, INTERP: tl.constexpr, PREC: tl.constexpr):
    """One sub-chunk of BC rows, all of K. Stores its rows of ``A`` below and on the diagonal (above it
    nothing: readers mask), of ``qg = q ∘ exp(G)`` and ``kg = k ∘ exp(G_C - G)``, and (first
    sub-chunk) the chunk decay ``gC = exp(G_C)``. Every exponent is a sum over its own range."""
    NC: tl.constexpr = BT // BC
    i_tc, i_h = tl.program_id(0), tl.program_id(1)
    i_t, i_c = i_tc // NC, i_tc % NC
    t0, L, _ = chunk_start(chunk_indices, cu, i_t, BT)
    s = i_c * BC
    o_r = tl.arange(0, BC)
    o_i = s + o_r
    m_i = o_i < L
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    m_ik = m_i[:, None] & m_k[None, :]
    p_i = (t0 + o_i)[:, None] * H * K + i_h * K + o_k[None, :]
    p_A = (t0 + o_i)[:, None] * H * BT + i_h * BT
    b_q = tl.load(q + p_i, mask=m_ik, other=0.0).to(tl.float32)
    b_k = tl.load(k + p_i, mask=m_ik, other=0.0).to(tl.float32)
    b_g = tl.load(g + p_i, mask=m_ik, other=0.0).to(tl.float32)
    b_P = tl.cumsum(b_g, axis=0)  # query i's decay from the sub-chunk start: sum_{s <= r <= i}
    b_qf = b_q * tl.exp(b_P)
    # earlier sub-chunks b, nearest first: key j reaches s through exp(sum_{j < r < s} g_r), its own
    # sub-chunk's suffix plus b_D, the sum over the whole sub-chunks between b and this one
    # (unrolled: as an scf.for loop, Triton 3.6 on Hopper computed every block after the first wrongly
    # for float32 inputs with K >= 64 at most warp counts)
    b_D = tl.zeros([BK], dtype=tl.float32)
    for ib in tl.static_range(NC - 1):
        if ib < i_c:
            o_j = (i_c - 1 - ib) * BC + o_r
            p_jT = (t0 + o_j)[None, :] * H * K + i_h * K + o_k[:, None]
            m_kj = m_k[:, None] & (o_j < L)[None, :]  # all rows, unless this sub-chunk lies past the segment end
            b_kT = tl.load(k + p_jT, mask=m_kj, other=0.0).to(tl.float32)
            b_gT = tl.load(g + p_jT, mask=m_kj, other=0.0).to(tl.float32)
            b_kf = b_kT * tl.exp(tl.cumsum(b_gT, axis=1, reverse=True) - b_gT + b_D[:, None])
            tl.store(A + p_A + o_j[None, :], mm(b_qf, b_kf, WT, INTERP, PREC), mask=m_i[:, None])
            b_D += tl.sum(b_gT, axis=1)
    tl.store(qg + p_i, (b_q * tl.exp(b_P + b_D[None, :])).to(qg.dtype.element_ty), mask=m_ik)
    # later sub-chunks: the keys' decay to the chunk end
    b_D = tl.zeros([BK], dtype=tl.float32)
    for ia in tl.static_range(1, NC):
        if ia > i_c:
            o_a = ia * BC + o_r
            b_ga = tl.load(g + (t0 + o_a)[:, None] * H * K + i_h * K + o_k[None, :],
                           mask=(o_a < L)[:, None] & m_k[None, :], other=0.0).to(tl.float32)
            b_D += tl.sum(b_ga, axis=0)
    b_kd = b_k * tl.exp(tl.cumsum(b_g, axis=0, reverse=True) - b_g + b_D[None, :])
    tl.store(kg + p_i, b_kd.to(kg.dtype.element_ty), mask=m_ik)
    if i_c == 0:
        tl.store(gC + (i_t * H + i_h) * K + o_k, tl.exp(tl.sum(b_g, axis=0) + b_D), mask=m_k)
    # the diagonal sub-chunk, key j from last to first; b_E[i] = sum_{j < r <= i} g_r for i >= j
    b_E = tl.zeros([BC, BK], dtype=tl.float32)
    b_Ad = tl.zeros([BC, BC], dtype=tl.float32)
    nx_k = _row(k, t0, s + BC - 1, L, i_h, o_k, H, K)
    nx_g = _row(g, t0, s + BC - 1, L, i_h, o_k, H, K)
    for jj in range(0, BC):
        j = BC - 1 - jj
        b_kj, b_gj = nx_k.to(tl.float32), nx_g.to(tl.float32)
        nx_k = _row(k, t0, s + j - 1, L, i_h, o_k, H, K)  # after j = 0 unused
        nx_g = _row(g, t0, s + j - 1, L, i_h, o_k, H, K)
        b_val = tl.sum(b_q * b_kj[None, :] * tl.exp(b_E), axis=1)
        b_Ad += tl.where((o_r[None, :] == j) & (o_r[:, None] >= j), b_val[:, None], 0.0)
        b_E += tl.where(o_r[:, None] >= j, b_gj[None, :], 0.0)
    tl.store(A + p_A + o_i[None, :], b_Ad, mask=m_i[:, None])


@triton.jit
def _gla_bwd_intra_kernel(q, k, g, dA, dq_inter, dk_inter, dq, dk, a_tok, b_tok, cu, chunk_indices,
                          H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                          WT: tl.constexpr, INTERP: tl.constexpr, PREC: tl.constexpr):
    """Add the intra-chunk parts of dq, dk for one sub-chunk of BC rows and one key block; store dq,
    dk and the per-token parts of the decay gradient (README, "gate gradients"). ``dA`` holds the
    score gradients on and below the diagonal."""
    NC: tl.constexpr = BT // BC
    i_tc, i_h, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_t, i_c = i_tc // NC, i_tc % NC
    t0, L, _ = chunk_start(chunk_indices, cu, i_t, BT)
    s = i_c * BC
    o_r = tl.arange(0, BC)
    o_i = s + o_r
    m_i = o_i < L
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    m_ik = m_i[:, None] & m_k[None, :]
    p_i = (t0 + o_i)[:, None] * H * K + i_h * K + o_k[None, :]
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
            b_kf = b_kj * tl.exp(tl.cumsum(b_gj, axis=0, reverse=True) - b_gj + b_D[None, :])
            b_dAb = tl.load(dA + p_A[:, None] + o_j[None, :], mask=m_i[:, None], other=0.0)
            b_dq += mm(b_dAb, b_kf, WT, INTERP, PREC)
            b_D += tl.sum(b_gj, axis=0)
    b_dq *= tl.exp(tl.cumsum(b_g, axis=0))
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
            b_qf = b_qa * tl.exp(tl.cumsum(b_ga, axis=0) + b_D[None, :])
            b_dAT = tl.load(dA + ((t0 + o_a) * H * BT + i_h * BT)[None, :] + o_i[:, None],
                            mask=m_i[:, None] & m_a[None, :], other=0.0)
            b_dk += mm(b_dAT, b_qf, WT, INTERP, PREC)
            b_D += tl.sum(b_ga, axis=0)
    b_dk *= tl.exp(tl.cumsum(b_g, axis=0, reverse=True) - b_g)
    # the diagonal sub-chunk without each token's pairing with itself: that pair cancels exactly in
    # the decay gradient q ∘ dq - k ∘ dk, and summed in, it would swamp small gradients.
    # dq from keys j (last to first), b_E[i] = sum_{j < r <= i} g_r for i >= j
    b_E = tl.zeros([BC, BK], dtype=tl.float32)
    nx_k = _row(k, t0, s + BC - 1, L, i_h, o_k, H, K)
    nx_g = _row(g, t0, s + BC - 1, L, i_h, o_k, H, K)
    nx_a = tl.zeros([BC], dtype=tl.float32)  # the last row pairs with no later row of the sub-chunk
    for jj in range(0, BC):
        j = BC - 1 - jj
        b_kr, b_gr, b_a = nx_k.to(tl.float32), nx_g.to(tl.float32), nx_a
        # the next key j - 1 (unused after j = 0), read by the rows after it
        nx_k = _row(k, t0, s + j - 1, L, i_h, o_k, H, K)
        nx_g = _row(g, t0, s + j - 1, L, i_h, o_k, H, K)
        nx_a = tl.load(dA + p_A + s + j - 1, mask=m_i & (o_r >= j) & ((j + 0 * o_r) > 0), other=0.0)
        b_dq += b_a[:, None] * b_kr[None, :] * tl.exp(b_E)
        b_E += tl.where(o_r[:, None] >= j, b_gr[None, :], 0.0)
    # dk from queries i (first to last), b_F[j] = sum_{j < r <= i} g_r for j <= i
    b_F = tl.zeros([BC, BK], dtype=tl.float32)
    nx_q = _row(q, t0, s, L, i_h, o_k, H, K)
    nx_g = _row(g, t0, s, L, i_h, o_k, H, K)
    nx_a = tl.zeros([BC], dtype=tl.float32)  # row s pairs with no earlier key of the sub-chunk
    for i in range(0, BC):
        b_qr, b_gr, b_a = nx_q.to(tl.float32), nx_g.to(tl.float32), nx_a
        # the next query i + 1 (unused after i = BC - 1; always inside the segment), read by the keys before it
        nx_q = _row(q, t0, s + i + 1, L, i_h, o_k, H, K)
        nx_g = _row(g, t0, s + i + 1, L, i_h, o_k, H, K)
        nx_a = tl.load(dA + (t0 + s + i + 1) * H * BT + i_h * BT + o_i,
                       mask=m_i & (o_r <= i) & ((s + i + 1 + 0 * o_r) < L), other=0.0)
        b_F += tl.where(o_r[:, None] < i, b_gr[None, :], 0.0)
        b_dk += b_a[:, None] * b_qr[None, :] * tl.exp(b_F)
    # each token with itself
    b_dAd = tl.load(dA + p_A + o_i, mask=m_i, other=0.0)[:, None]
    b_dq += tl.load(dq_inter + p_i, mask=m_ik, other=0.0)
    b_dki = tl.load(dk_inter + p_i, mask=m_ik, other=0.0)
    tl.store(dq + p_i, (b_dq + b_dAd * b_k).to(dq.dtype.element_ty), mask=m_ik)
    tl.store(dk + p_i, (b_dk + b_dki + b_dAd * b_q).to(dk.dtype.element_ty), mask=m_ik)
    tl.store(a_tok + p_i, b_q * b_dq - b_k * b_dk, mask=m_ik)
    tl.store(b_tok + p_i, b_k * b_dki, mask=m_ik)


def gla_prep(q: Tensor, k: Tensor, g: Tensor, meta) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(A [Ttot, H, C] float32, qg, kg [Ttot, H, K] in the work dtype, gC [NT, H, K] float32)``."""
    Ttot, H, K = q.shape
    wdt = work_dtype(q.dtype)
    A = q.new_empty(Ttot, H, CHUNK, dtype=torch.float32)
    qg, kg = q.new_empty(q.shape, dtype=wdt), q.new_empty(q.shape, dtype=wdt)
    gC = q.new_empty(meta.num_chunks, H, K, dtype=torch.float32)
    grid = (meta.num_chunks * (CHUNK // SUB), H)
    _gla_prep_kernel[grid](q, k, g, A, qg, kg, gC, meta.cu, meta.chunk_indices, H=H, K=K, BT=CHUNK, BC=SUB,
                           BK=pow2(K), **dots(q.dtype, False), **launch("gl.gla_prep"))
    return A, qg, kg, gC


def gla_bwd_intra(q, k, g, dA, dq_inter, dk_inter, meta) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dq, dk, a_tok, b_tok)``: the gradients and the decay gradient's per-token parts."""
    Ttot, H, K = q.shape
    BK = min(64, pow2(K))
    dq, dk = q.new_empty(q.shape), k.new_empty(k.shape)
    a_tok, b_tok = (q.new_empty(Ttot, H, K, dtype=torch.float32) for _ in range(2))
    grid = (meta.num_chunks * (CHUNK // SUB), H, triton.cdiv(K, BK))
    _gla_bwd_intra_kernel[grid](q, k, g, dA, dq_inter, dk_inter, dq, dk, a_tok, b_tok, meta.cu, meta.chunk_indices,
                                H=H, K=K, BT=CHUNK, BC=SUB, BK=BK, **dots(q.dtype, False),
                                **launch("gl.gla_bwd_intra"))
    return dq, dk, a_tok, b_tok
