"""Chunked forward and backward of the delta family (deltanet, gated_deltanet) in the WY / UT form.

``S' = exp(g_t) S_{t-1};  S_t = S' + beta_t k_t (v_t - S'^T k_t)^T``, ``o_t = scale S_t^T q_t``
(deltanet: g = 0, the constexpr ``GATED`` off). Per chunk, ``T = (I + A)^{-1}`` with
``A_ij = beta_i (k_i . k_j) exp(G_i - G_j)`` (j < i); ``w = T diag(beta) (k ∘ gamma)``,
``u = T diag(beta) v``; the state pass turns them into pseudo-values ``v_new = u - w h`` and the
output is the gated linear family's output on ``v_new`` (``kernels/gated_linear``). The log-decay
gradient comes from the identity ``dG_t = q_t . dq_t - v_t . dv_t``.

Shapes (packed): q, k ``[Ttot, H, K]``, v ``[Ttot, H, V]``, beta, g ``[Ttot, H]``, ``T [Ttot, H, BT]``,
states ``[N, H, K, V]`` float32. Derivation: ``kernels/delta/README.md``.
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
    program_slots,
    range_pieces,
    state_groups,
    work_dtype,
)
from ..gated_linear.chunk import _decay_matrix, bwd_dv, chunk_dg, fwd_o
from .state import _state_blocks, delta_bwd_dh, delta_fwd_h, gc_wanted

Tensor = torch.Tensor

# The forward and backward run group by group of rows where their chunk states (h, and the backward's dh the
# same size) would pass this many bytes and splitting costs little time (``state_groups``): the MoM layer's
# packed call at B4 T2048 or B1 T8192, K = V = 256, holds 200 MB of states per buffer. On an H100 at this
# budget the layer's forward+backward peaks at 736 MiB at B4 T2048 M4 and 793 at B1 T8192 (fla's MomAttention:
# 953 and 814), at 128 MiB at 920 and 917, for 4-6 % more GPU time than at 128
# (benchmarks/results/state_budget_h100_7e7db1b.txt); the single-memory layer at B4 T2048 stays whole.
STATE_BUDGET = 64 * 2**20


@triton.jit
def unit_lower_inverse(b_A, BT: tl.constexpr, PREC: tl.constexpr):
    """``(I + A)^{-1}`` for a strictly lower-triangular ``A [BT, BT]`` (float32, BT a multiple of 16).

    Forward substitution inside the 16 x 16 diagonal blocks (all blocks at once, 15 steps), giving
    ``D = (I + A_d)^{-1}``; then ``(I + A)^{-1} = (I + N)^{-1} D`` with ``N = D A_o`` block-strictly
    lower, so ``(I + N)^{-1} = (I - N)(I + N^2)`` for up to 4 blocks (``N^4 = 0``).
    """
    NB: tl.constexpr = BT // 16
    o_b = tl.arange(0, NB)
    o_r = tl.arange(0, 16)
    same = o_b[:, None, None, None] == o_b[None, None, :, None]  # [NB, 1, NB, 1]
    b_A3 = tl.sum(tl.where(same, tl.reshape(b_A, (NB, 16, NB, 16)), 0.0), axis=2)  # [NB, 16, 16]
    b_D3 = tl.zeros([NB, 16, 16], dtype=tl.float32) + tl.where(o_r[:, None] == o_r[None, :], 1.0, 0.0)[None, :, :]
    for i in range(1, 16):
        b_a = tl.sum(tl.where(o_r[None, :, None] == i, b_A3, 0.0), axis=1)  # [NB, 16]: row i of each block
        b_new = tl.where(o_r[None, :] == i, 1.0, 0.0) - tl.sum(b_a[:, :, None] * b_D3, axis=1)
        b_D3 = tl.where(o_r[None, :, None] == i, b_new[:, None, :], b_D3)
    b_D = tl.reshape(tl.where(same, b_D3[:, :, None, :], 0.0), (BT, BT))
    o_t = tl.arange(0, BT)
    b_Ao = tl.where((o_t[:, None] // 16) != (o_t[None, :] // 16), b_A, 0.0)
    b_N = tl.dot(b_D, b_Ao, input_precision=PREC)
    eye = tl.where(o_t[:, None] == o_t[None, :], 1.0, 0.0)
    b_N2 = tl.dot(b_N, b_N, input_precision=PREC)
    b_X = tl.dot(eye - b_N, eye + b_N2, input_precision=PREC)
    return tl.dot(b_X, b_D, input_precision=PREC)


@triton.jit
def _wy_fwd_kernel(k, v, beta, g, Tm, w, u, u_off, gc, cu, chunk_indices,
                   H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                   BK: tl.constexpr, BV: tl.constexpr, GATED: tl.constexpr, LOAD_T: tl.constexpr,
                   U_OFF: tl.constexpr, STORE_GC: tl.constexpr, IT: tl.constexpr, WT: tl.constexpr,
                   INTERP: tl.constexpr, PREC: tl.constexpr):
    """``T = (I + A)^{-1}`` (stored unless LOAD_T, which reads it), ``w = T diag(beta)(k ∘ gamma)``,
    ``u = T diag(beta) v`` of one chunk; with U_OFF also ``u`` without each token's own value
    (the diagonal ``beta_t v_t``), for the decay gradient; with STORE_GC (gated) ``gc [Ttot, H, 2]``
    (float32): per token the log decays summed from the chunk's start to it and from it (excluded) to the
    chunk's end, which the state passes can read instead of summing them in their sequential loop. Both
    sums are kept: the second as the difference of the first's values lost precision under strong decays
    (about -8 per token: 64 of them sum to -500, whose float32 rounding is 3e-5)."""
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    t0, L, _ = chunk_start(chunk_indices, cu, i_t, BT)
    o_t = tl.arange(0, BT)
    m_t = o_t < L
    tok = t0 + o_t
    b_beta = tl.load(beta + tok * H + i_h, mask=m_t, other=0.0).to(tl.float32)
    if GATED:
        b_g = tl.load(g + tok * H + i_h, mask=m_t, other=0.0).to(tl.float32)
        b_gcs = tl.cumsum(b_g, axis=0)
        b_gam = tl.exp(b_gcs)
        if STORE_GC:
            tl.store(gc + (tok * H + i_h) * 2, b_gcs, mask=m_t)
            tl.store(gc + (tok * H + i_h) * 2 + 1, tl.cumsum(b_g, axis=0, reverse=True) - b_g, mask=m_t)
    p_T = tok[:, None] * H * BT + i_h * BT + o_t[None, :]
    if LOAD_T:
        b_T = tl.load(Tm + p_T, mask=m_t[:, None], other=0.0)
    else:
        b_A = chunk_gram(k, k, tok, i_h, m_t, H, K, BT, BK, IT, INTERP, PREC) * b_beta[:, None]
        if GATED:
            b_A *= _decay_matrix(b_g, BT)
        b_A = tl.where(o_t[:, None] > o_t[None, :], b_A, 0.0)
        b_T = unit_lower_inverse(b_A, BT, PREC)
        tl.store(Tm + p_T, b_T, mask=m_t[:, None])
    b_Tb = (b_T * b_beta[None, :]).to(WT)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_tk = m_t[:, None] & (o_k[None, :] < K)
        p_k = tok[:, None] * H * K + i_h * K + o_k[None, :]
        b_k = tl.load(k + p_k, mask=m_tk, other=0.0).to(tl.float32)
        if GATED:
            b_k *= b_gam[:, None]
        b_w = mm(b_Tb, b_k, WT, INTERP, PREC)
        tl.store(w + p_k, b_w.to(w.dtype.element_ty), mask=m_tk)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v[None, :] < V)
        p_v = tok[:, None] * H * V + i_h * V + o_v[None, :]
        b_v = tl.load(v + p_v, mask=m_tv, other=0.0)
        b_u = mm(b_Tb, b_v, WT, INTERP, PREC)
        tl.store(u + p_v, b_u.to(u.dtype.element_ty), mask=m_tv)
        if U_OFF:
            b_uo = mm(tl.where(o_t[:, None] == o_t[None, :], 0.0, b_Tb), b_v, WT, INTERP, PREC)
            tl.store(u_off + p_v, b_uo.to(u_off.dtype.element_ty), mask=m_tv)


@triton.jit
def _bwd_dqkw_kernel(q, k, v_new, dovr, g, qk, h, do, dh, dv_tot, dv_local, du_inter, dq, dk, dw, a_part, s_part, cu,
                     chunk_indices, scale, Ttot, n_r,
                     H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                     BK: tl.constexpr, BV: tl.constexpr, GATED: tl.constexpr, NR: tl.constexpr,
                     IT: tl.constexpr, WT: tl.constexpr, INTERP: tl.constexpr, PREC: tl.constexpr):
    """dq (final), the output/state part of dk (float32, built transposed) and ``dw = -dv_tot h^T``
    of one chunk and key block, ``dw`` written over ``w``. GATED: ``dv_tot`` summed here from its parts
    (``dv_local``, the scores' diagonal ``scale * qk * do``, ``du_inter``); the per-token part ``q . dq``
    of the decay gradient without each token's pairing with its own value (through ``do . vr``, with ``vr``
    the pseudo-values without it, summed from its ``n_r <= NR`` parts in ``dovr``); and this key block's
    part of the per-chunk term ``<gamma_C dh_{c+1}, h_c>`` into ``s_part [NK, NT, H]``, in a pass of its
    own over the value blocks before the main one: summed in the main pass beside the dq, dk and dw
    accumulators it made the kernel spill more; in the forward state pass (which holds ``h_c``) its loads
    of ``dh``, feeding no product, were not pipelined and cost more than this pass (H100,
    gated_deltanet, forward+backward at B4 T4096: 1564 -> 1615 us at K = V = 128; at K = V = 256 the
    forward state passes took 1013 us against 502). The term's other part ``-<du_inter, w h_c>`` and the
    ``do . vr`` parts come from the backward's forward state pass, where ``w h_c`` is at hand."""
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
    p_k = tok[:, None] * H * K + i_h * K + o_k[None, :]
    if GATED:
        b_hdh = tl.zeros([BK], dtype=tl.float32)
        for i_v in range(0, tl.cdiv(V, BV)):
            o_v = i_v * BV + tl.arange(0, BV)
            m_kv = m_k[:, None] & (o_v[None, :] < V)
            b_hc = tl.load(h + p_h + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0.0).to(tl.float32)
            b_dh = tl.load(dh + p_h + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0.0).to(tl.float32)
            b_hdh += tl.sum(b_dh * b_hc, axis=1)
        b_gl = tl.load(g + tok * H + i_h, mask=m_t, other=0.0).to(tl.float32)
        tl.store(s_part + (i_k * tl.num_programs(0) + i_t) * H + i_h,
                 tl.exp(tl.sum(b_gl, axis=0)) * tl.sum(b_hdh, axis=0))
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dw = tl.zeros([BT, BK], dtype=tl.float32)
    b_dkT = tl.zeros([BK, BT], dtype=tl.float32)
    b_dA = tl.zeros([BT, BT], dtype=tl.float32)
    if GATED:
        b_qk = tl.load(qk + tok * H + i_h, mask=m_t, other=0.0)
        o_r = tl.arange(0, NR)
        b_dovr = tl.sum(tl.load(dovr + (o_r[None, :] * Ttot + tok[:, None]) * H + i_h,
                                mask=m_t[:, None] & (o_r[None, :] < n_r), other=0.0), axis=1)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        p_v = tok[:, None] * H * V + i_h * V + o_v[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        b_do = tl.load(do + p_v, mask=m_tv, other=0.0)
        if GATED:
            b_dv = (tl.load(dv_local + p_v, mask=m_tv, other=0.0).to(tl.float32)
                    + tl.load(du_inter + p_v, mask=m_tv, other=0.0).to(tl.float32)
                    + (scale * b_qk)[:, None] * b_do.to(tl.float32))
        else:
            b_dv = tl.load(dv_tot + p_v, mask=m_tv, other=0.0)
        b_vT = tl.load(v_new + tok[None, :] * H * V + i_h * V + o_v[:, None], mask=m_v[:, None] & m_t[None, :],
                       other=0.0)
        b_hT = tl.load(h + p_h + o_k[None, :] * V + o_v[:, None], mask=m_v[:, None] & m_k[None, :], other=0.0)
        b_dh = tl.load(dh + p_h + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0.0)
        b_dA += mm(b_do, b_vT, WT, INTERP, PREC)
        b_dq += mm(b_do, b_hT, WT, INTERP, PREC)
        b_dw += mm(b_dv, b_hT, WT, INTERP, PREC)
        b_dkT += mm(b_dh, b_vT, WT, INTERP, PREC)
    b_dA = b_dA * scale
    b_dq = b_dq * scale
    if GATED:
        b_g = tl.load(g + tok * H + i_h, mask=m_t, other=0.0).to(tl.float32)
        b_dq *= tl.exp(tl.cumsum(b_g, axis=0))[:, None]
        b_dkT *= tl.exp(tl.cumsum(b_g, axis=0, reverse=True) - b_g)[None, :]
        b_dA *= _decay_matrix(b_g, BT)
    else:
        b_dA = tl.where(o_t[:, None] >= o_t[None, :], b_dA, 0.0)
    b_k = tl.load(k + p_k, mask=m_tk, other=0.0)
    b_qT = tl.load(q + tok[None, :] * H * K + i_h * K + o_k[:, None], mask=m_kt, other=0.0)
    if GATED:
        # the diagonal of dA apart: a token's output reads its own value, a pairing that cancels in
        # the decay gradient; there it is replaced by the rest of its pseudo-value (vr)
        b_d = tl.sum(tl.where(o_t[:, None] == o_t[None, :], b_dA, 0.0), axis=1)
        b_dA = tl.where(o_t[:, None] > o_t[None, :], b_dA, 0.0)
        b_dq += mm(b_dA, b_k, WT, INTERP, PREC)
        b_q = tl.load(q + p_k, mask=m_tk, other=0.0).to(tl.float32)
        b_kf = b_k.to(tl.float32)
        tl.store(a_part + (i_k * Ttot + tok) * H + i_h,
                 tl.sum(b_q * b_dq, axis=1) + scale * tl.sum(b_q * b_kf, axis=1) * b_dovr, mask=m_t)
        b_dq += b_d[:, None] * b_kf
        b_dkT += mm(b_qT, b_dA, WT, INTERP, PREC) + b_d[None, :] * b_qT.to(tl.float32)
    else:
        b_dq += mm(b_dA, b_k, WT, INTERP, PREC)
        b_dkT += mm(b_qT, b_dA, WT, INTERP, PREC)
    tl.store(dq + p_k, b_dq.to(dq.dtype.element_ty), mask=m_tk)
    tl.store(dk + tok[None, :] * H * K + i_h * K + o_k[:, None], b_dkT, mask=m_kt)
    tl.store(dw + p_k, -b_dw, mask=m_tk)


@triton.jit
def _wy_bwd_kernel(qk, k, v, beta, g, Tm, do, dw, du, du_inter, dk_part, dk, dv, dbeta, a_neg, b_tok, scratch,
                   cu, chunk_indices, scale, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                   BK: tl.constexpr, BV: tl.constexpr, GATED: tl.constexpr,
                   IT: tl.constexpr, WT: tl.constexpr, INTERP: tl.constexpr, PREC: tl.constexpr):
    """Back through ``w = T diag(beta)(k ∘ gamma)``, ``u = T diag(beta) v`` and ``T = (I + A)^{-1}``:
    final dk, dv and dbeta of one chunk. ``du`` is the pseudo-values' gradient; GATED: its local part
    without the diagonal of A (which is added here) and its part from later chunks ``du_inter`` apart,
    for the decay gradient's per-token parts: ``a_neg = -v . dv`` without a token's pairing with its
    own output and without ``b = v . dv_inter`` (``qk [Ttot, H]``: ``q_t . k_t``, for that pairing).

    Written in three phases so that few ``[BT, BT]`` tiles are live at once: the kernel runs at two
    warps (on Hopper with Triton 3.6, four warps miscompile this backward, as fla found for its own,
    fla issue #984), where a float32 ``[64, 64]`` tile takes 64 registers per thread. Phase 1 holds
    ``dTb`` and ``Tb^T``; phase 2 holds ``dA`` and the key Gram matrix; phase 3 reloads ``Tb^T``.
    ``T`` and ``T^T`` are read from memory when needed rather than kept. ``dB^T`` goes through a
    per-chunk scratch tile in global memory instead of transposing a matmul result in registers."""
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    t0, L, _ = chunk_start(chunk_indices, cu, i_t, BT)
    o_t = tl.arange(0, BT)
    m_t = o_t < L
    tok = t0 + o_t
    p_T = tok[:, None] * H * BT + i_h * BT + o_t[None, :]  # T[i, j]
    p_TT = tok[None, :] * H * BT + i_h * BT + o_t[:, None]  # T^T[i, j] = T[j, i]
    b_beta = tl.load(beta + tok * H + i_h, mask=m_t, other=0.0).to(tl.float32)
    if GATED:
        b_g = tl.load(g + tok * H + i_h, mask=m_t, other=0.0).to(tl.float32)
        b_gam = tl.exp(tl.cumsum(b_g, axis=0))
    # ---- phase 1: dTb = dw (K ∘ gamma)^T + du V^T, dv = Tb^T du
    b_dTb = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_kgT = tl.load(k + tok[None, :] * H * K + i_h * K + o_k[:, None], mask=m_k[:, None] & m_t[None, :],
                        other=0.0).to(tl.float32)
        if GATED:
            b_kgT *= b_gam[None, :]
        b_dw = tl.load(dw + tok[:, None] * H * K + i_h * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :],
                       other=0.0)
        b_dTb += mm(b_dw, b_kgT, WT, INTERP, PREC)
    # (T diag(beta))^T; GATED: without its diagonal (beta, as T's diagonal is exactly 1), which is
    # applied apart in float32, so a token's pairing with its own value stays out of the decay gradient
    b_TbT = tl.load(Tm + p_TT, mask=m_t[None, :], other=0.0) * b_beta[:, None]
    if GATED:
        b_TbT = tl.where(o_t[:, None] == o_t[None, :], 0.0, b_TbT)
    b_TbT = b_TbT.to(WT)
    b_xa = tl.zeros([BT], dtype=tl.float32)
    b_xb = tl.zeros([BT], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        m_tv = m_t[:, None] & m_v[None, :]
        p_v = tok[:, None] * H * V + i_h * V + o_v[None, :]
        b_du = tl.load(du + p_v, mask=m_tv, other=0.0).to(tl.float32)
        b_vT = tl.load(v + tok[None, :] * H * V + i_h * V + o_v[:, None], mask=m_v[:, None] & m_t[None, :], other=0.0)
        if GATED:
            b_v = tl.load(v + p_v, mask=m_tv, other=0.0).to(tl.float32)
            b_xa += b_beta * tl.sum(b_v * b_du, axis=1)
            b_sqk = scale * tl.load(qk + tok * H + i_h, mask=m_t, other=0.0)
            b_dl = b_du + b_sqk[:, None] * tl.load(do + p_v, mask=m_tv, other=0.0).to(tl.float32)
            b_dui = tl.load(du_inter + p_v, mask=m_tv, other=0.0).to(tl.float32)
            b_dTb += mm(b_dl + b_dui, b_vT, WT, INTERP, PREC)
            b_P1 = mm(b_TbT, b_dl, WT, INTERP, PREC)  # off the diagonal
            b_xa += tl.sum(b_v * b_P1, axis=1)
            b_P2 = mm(b_TbT, b_dui, WT, INTERP, PREC) + b_beta[:, None] * b_dui
            b_xb += tl.sum(b_v * b_P2, axis=1)
            b_dv = b_P1 + b_beta[:, None] * b_dl + b_P2
        else:
            b_dTb += mm(b_du, b_vT, WT, INTERP, PREC)
            b_dv = mm(b_TbT, b_du, WT, INTERP, PREC)
        tl.store(dv + p_v, b_dv.to(dv.dtype.element_ty), mask=m_tv)
    # ---- phase 2: dA = -T^T (dTb diag(beta)) T^T (strictly lower), dbeta
    b_dbeta = tl.sum(b_dTb * tl.load(Tm + p_T, mask=m_t[:, None], other=0.0), axis=0)  # dbeta_j = sum_i dTb_ij T_ij
    b_TT = tl.load(Tm + p_TT, mask=m_t[None, :], other=0.0)
    b_dA = -tl.dot(tl.dot(b_TT, b_dTb * b_beta[None, :], input_precision=PREC), b_TT, input_precision=PREC)
    b_dA = tl.where(o_t[:, None] > o_t[None, :], b_dA, 0.0)
    if GATED:
        b_dA *= _decay_matrix(b_g, BT)
    # the Gram loop written out here (not chunk_gram): this kernel's sm_90 code is kept as tested at two
    # warps, the configuration that avoids the Hopper miscompile (fla issue #640)
    b_KK = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_k = tl.load(k + tok[:, None] * H * K + i_h * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_kT = tl.load(k + tok[None, :] * H * K + i_h * K + o_k[:, None], mask=m_k[:, None] & m_t[None, :], other=0.0)
        b_KK += mm(b_k, b_kT, IT, INTERP, PREC)
    b_dbeta += tl.sum(b_dA * b_KK, axis=1)  # A_ij = beta_i (k_i . k_j) Γ_ij
    tl.store(dbeta + tok * H + i_h, b_dbeta.to(dbeta.dtype.element_ty), mask=m_t)
    if GATED:
        tl.store(a_neg + tok * H + i_h, -b_xa, mask=m_t)
        tl.store(b_tok + tok * H + i_h, b_xb, mask=m_t)
    b_dB = b_dA * b_beta[:, None]  # gradient of k_i . k_j (j < i)
    p_s = (i_t * H + i_h).to(tl.int64) * BT * BT
    tl.store(scratch + p_s + o_t[:, None] * BT + o_t[None, :], b_dB)
    tl.debug_barrier()
    b_dBs = (b_dB + tl.load(scratch + p_s + o_t[None, :] * BT + o_t[:, None])).to(WT)  # dB + dB^T
    # ---- phase 3: dk = dk_part + (Tb^T dw) ∘ gamma + (dB + dB^T) K
    b_TbT = (tl.load(Tm + p_TT, mask=m_t[None, :], other=0.0) * b_beta[:, None]).to(WT)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_tk = m_t[:, None] & (o_k[None, :] < K)
        p_k = tok[:, None] * H * K + i_h * K + o_k[None, :]
        b_dkw = mm(b_TbT, tl.load(dw + p_k, mask=m_tk, other=0.0), WT, INTERP, PREC)
        if GATED:
            b_dkw *= b_gam[:, None]
        b_dk = tl.load(dk_part + p_k, mask=m_tk, other=0.0) + b_dkw
        b_dk += mm(b_dBs, tl.load(k + p_k, mask=m_tk, other=0.0), WT, INTERP, PREC)
        tl.store(dk + p_k, b_dk.to(dk.dtype.element_ty), mask=m_tk)


# ---------------------------------------------------------------------------------------------- launchers
def wy_fwd(k, v, beta, g, meta, Tm=None, u_off=False, T_out=None):
    """``(T, w, u, u_off or None, gc or None)``; with ``Tm`` given, only ``w, u`` (and ``u_off``) are recomputed
    from it; otherwise T goes into ``T_out`` where given. ``gc``: gated, where a state pass is set to read
    them (``gc_wanted``), the chunk-local cumulative log decays from and to the chunk's ends
    (``_wy_fwd_kernel``)."""
    Ttot, H, K = k.shape
    V = v.shape[-1]
    wdt = work_dtype(k.dtype)
    load = Tm is not None
    if not load:
        Tm = k.new_empty(Ttot, H, CHUNK, dtype=torch.float32) if T_out is None else T_out
    w = k.new_empty(Ttot, H, K, dtype=wdt)
    u = k.new_empty(Ttot, H, V, dtype=wdt)
    uo = k.new_empty(Ttot, H, V, dtype=wdt) if u_off else None
    gc = k.new_empty(Ttot, H, 2, dtype=torch.float32) if g is not None and gc_wanted() else None
    BK, BV = min(64, pow2(K)), min(64, pow2(V))
    opts = mixed_block_warps("delta.wy_fwd", launch("delta.wy_fwd"), k.device, BV < BK)
    _wy_fwd_kernel[(meta.num_chunks, H)](k, v, beta, g, Tm, w, u, uo, gc, meta.cu, meta.chunk_indices, H=H, K=K,
                                         V=V, BT=CHUNK, BK=BK, BV=BV, GATED=g is not None, LOAD_T=load, U_OFF=u_off,
                                         STORE_GC=gc is not None, **dots(k.dtype), **opts)
    return Tm, w, u, uo, gc


def wy_bwd(qk, k, v, beta, g, Tm, do, dw, du, du_inter, dk_part, a_neg, scale, meta, out=None):
    """dk, dv, dbeta (into ``out`` where given) and (gated) the decay gradient's per-token part ``b_tok``
    (``a_neg`` is written) from the WY representation's gradients (``_wy_bwd_kernel``)."""
    Ttot, H, K = k.shape
    V = v.shape[-1]
    gated = g is not None
    dk, dv, dbeta = (k.new_empty(k.shape), v.new_empty(v.shape), beta.new_empty(beta.shape)) if out is None else out
    b_tok = k.new_empty(Ttot, H, dtype=torch.float32) if gated else None
    scratch = k.new_empty(meta.num_chunks, H, CHUNK, CHUNK, dtype=torch.float32)
    # two warps: four give NaN dk / illegal accesses on Hopper with Triton 3.6 (fla issue #984). At two
    # warps a [64, 64] float32 tile is 64 registers per thread, hence the narrow key and value blocks
    # (32 and 16: the fewest spills in the sm_90 resource report, benchmarks/gpu_debug.py --resources).
    opts = launch("delta.wy_bwd", num_warps=2, BK=min(32, pow2(K)), BV=16)
    BK, BV = opts.pop("BK"), opts.pop("BV")
    _wy_bwd_kernel[(meta.num_chunks, H)](qk, k, v, beta, g, Tm, do, dw, du, du_inter, dk_part, dk, dv, dbeta, a_neg,
                                         b_tok, scratch, meta.cu, meta.chunk_indices, scale, H=H, K=K, V=V,
                                         BT=CHUNK, BK=BK, BV=BV, GATED=gated, **dots(k.dtype), **opts)
    return dk, dv, dbeta, b_tok


def _backward(q, k, v, beta, g, h0, Tm, do, dht, scale, meta, out=None):
    """The gradients of q, k, v, beta, g (None ungated) and h0 (None without) for the segments of ``meta``;
    those of q, k, v, beta, g into ``out`` where given."""
    Ttot, H, K = q.shape
    V = v.shape[-1]
    NT = meta.num_chunks
    gated = g is not None
    f32 = torch.float32
    _, w, u, u_off, gc = wy_fwd(k, v, beta, g, meta, Tm, u_off=gated)
    wdt = u.dtype
    if not gated:  # each intermediate goes as soon as its last reader is done: the backward's peak memory
        h, v_new, _, dovr, _ = delta_fwd_h(k, w, u, g, h0, False, meta)
        del u
    # gated: the local part of the pseudo-values' gradient without the diagonal of A (README), and that
    # diagonal q_t . k_t of the output scores, which both state-pass kernels read
    qk = None
    dv_local = bwd_dv(q, k, g, None, None, do, None, int(gated), scale, meta, wdt, V, no_diag=gated)
    if gated:
        dv_local, qk = dv_local
    dh, dv_tot, du_inter, dh0 = delta_bwd_dh(q, k, w, g, qk, do, dv_local, dht, h0 is not None, scale, meta, gc)
    s_wh = None
    if gated:  # the reverse pass reads no forward state, so the forward pass can follow it and take du_inter
        h, v_new, _, dovr, s_wh = delta_fwd_h(k, w, u, g, h0, False, meta, gc, (u_off, du_inter, do))
        del u, u_off

    BKb, BVb = min(64, pow2(K)), min(64, pow2(V))
    NK = triton.cdiv(K, BKb)
    dq = q.new_empty(q.shape) if out is None else out[0]
    # dk_part stays float32: rounding it (as fla does its dk) raised gated_deltanet's bfloat16 dk error
    # from 2.8 to 4.3 roundoff units. dw enters wy_bwd's products only, which round it to the work dtype
    # anyway, so it is written over w (the same dtype and layout; the kernel does not read w)
    dk_part = q.new_empty(Ttot, H, K, dtype=f32)
    dw = w
    a_part = q.new_empty(NK + 1, Ttot, H, dtype=f32) if gated else None  # NK parts of q . dq, then -v . dv
    s_part = q.new_empty(NK, NT, H, 1, dtype=f32) if gated else None
    # eight warps at K = V = 256 (H100: 382 -> 332 us at B4 T2048 H4, benchmarks/results/tune_launch_h100.txt);
    # at K = V = 128 eight were slower (245 -> 342 us), so narrower widths keep Triton's default of four
    n_r = 1 if dovr is None else len(dovr)
    dqkw_opts = launch("delta.bwd_dqkw", **({"num_warps": 8} if min(K, V) >= 256 else {}))
    _bwd_dqkw_kernel[(NT, H, NK)](q, k, v_new, dovr, g, qk, h, do, dh, dv_tot, dv_local, du_inter, dq, dk_part, dw,
                                  a_part, s_part, meta.cu, meta.chunk_indices, scale, Ttot, n_r, H=H, K=K, V=V,
                                  BT=CHUNK, BK=BKb, BV=BVb, GATED=gated, NR=pow2(n_r), **dots(q.dtype),
                                  **mixed_block_warps("delta.bwd_dqkw", dqkw_opts, q.device, BVb > BKb))
    dv_wy = dv_local if gated else dv_tot
    del w, h, dh, v_new, dovr, dv_local, dv_tot
    dk, dv, dbeta, b_tok = wy_bwd(qk, k, v, beta, g, Tm, do, dw, dv_wy, du_inter, dk_part,
                                  None if a_part is None else a_part[NK], scale, meta,
                                  None if out is None else out[1:4])
    dg = None
    if gated:
        s_part = torch.cat([s_part, s_wh[..., None]])
        dg = chunk_dg(a_part[..., None], b_tok[None, ..., None], s_part, meta, g.dtype, dots(q.dtype)["PREC"],
                      None if out is None else out[4][..., None])[..., 0]
    return dq, dk, dv, dbeta, dg, dh0


def _groups(q, v, meta) -> list[tuple[int, int]]:
    _, H, K = q.shape
    V = v.shape[-1]
    BV = _state_blocks(K, V)[2]
    return state_groups(meta, H * triton.cdiv(V, BV), H * K * V * work_dtype(q.dtype).itemsize, STATE_BUDGET,
                        program_slots(q.device))


def _rows(x: Tensor | None, a: int, b: int) -> Tensor | None:
    return None if x is None else x[a:b]


def _group(cu: tuple[int, ...], a: int, b: int, device: torch.device):
    """The pieces of rows ``a .. b`` (``range_pieces``) and their chunk layout."""
    pieces = range_pieces(cu, a, b)
    return pieces, chunk_meta(1, b - a, (*(lo - a for _, lo, _ in pieces), b - a), CHUNK, device)


def _group_states(pieces, cu, cut, per_segment, at_start: bool, k, v):
    """The per-piece initial states (``at_start``) or final-state gradients of a group: where a piece starts
    (ends) inside its segment, the state handed over at that cut (``cut[(n, row)]``); otherwise the segment's
    own (``per_segment``, or zeros without). None where no piece needs one and ``per_segment`` is None."""
    rows = []
    for n, lo, hi in pieces:
        inside = lo > cu[n] if at_start else hi < cu[n + 1]
        rows.append(cut[(n, lo if at_start else hi)] if inside else None if per_segment is None else per_segment[n])
    if all(r is None for r in rows):
        return None
    zero = k.new_zeros(*k.shape[1:], v.shape[-1], dtype=torch.float32)
    return torch.stack([zero if r is None else r for r in rows])


class DeltaChunk(torch.autograd.Function):
    """``(o, final_state)`` of deltanet / gated_deltanet on packed input ``[Ttot, H, *]``.

    Where the chunk states of the whole input would pass the budget (``state_groups``), the forward and the
    backward run group by group of rows: the chunk states and the other row buffers exist for one group at a
    time. A segment cut between two groups hands its float32 state on in the forward (saved for the backward)
    and the gradient of that state back in the backward, which runs the groups last to first."""

    @staticmethod
    def forward(ctx, q, k, v, beta, g, h0, scale, output_final_state, meta):
        groups = _groups(q, v, meta)
        ctx.scale, ctx.meta, ctx.groups = scale, meta, groups
        if len(groups) == 1:
            Tm, w, u, _, gc = wy_fwd(k, v, beta, g, meta)
            h, v_new, ht, _, _ = delta_fwd_h(k, w, u, g, h0, output_final_state, meta, gc)
            o = fwd_o(q, k, v_new, g, None, h, None, 0 if g is None else 1, scale, meta, v.dtype)
            ctx.save_for_backward(q, k, v, beta, g, h0, Tm)
            return o, ht
        cu = meta.cu_host
        o = torch.empty_like(v)
        Tm = k.new_empty(*k.shape[:2], CHUNK, dtype=torch.float32)
        finals, cut = [None] * meta.num_segments, {}
        for a, b in groups:
            pieces, sub = _group(cu, a, b, q.device)
            k_g, g_g = k[a:b], _rows(g, a, b)
            _, w, u, _, gc = wy_fwd(k_g, v[a:b], beta[a:b], g_g, sub, T_out=Tm[a:b])
            h, v_new, ht, _, _ = delta_fwd_h(k_g, w, u, g_g, _group_states(pieces, cu, cut, h0, True, k, v), True,
                                             sub, gc=gc)
            del w, u, gc
            fwd_o(q[a:b], k_g, v_new, g_g, None, h, None, 0 if g is None else 1, scale, sub, v.dtype, out=o[a:b])
            del h, v_new
            for i, (n, _, hi) in enumerate(pieces):
                if hi < cu[n + 1]:
                    cut[(n, hi)] = ht[i]
                else:
                    finals[n] = ht[i]
        ctx.cuts = list(cut)
        ctx.save_for_backward(q, k, v, beta, g, h0, Tm, *cut.values())
        return o, (torch.stack(finals) if output_final_state else None)

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, beta, g, h0, Tm, *carried = ctx.saved_tensors
        scale, meta, groups = ctx.scale, ctx.meta, ctx.groups
        do = do.contiguous()
        dht = contiguous(dht)
        if len(groups) == 1:
            return (*_backward(q, k, v, beta, g, h0, Tm, do, dht, scale, meta), None, None, None)
        cu = meta.cu_host
        cut = dict(zip(ctx.cuts, carried))
        grads = [torch.empty_like(x) for x in (q, k, v, beta)] + [None if g is None else torch.empty_like(g)]
        dh0, dcut = [None] * meta.num_segments, {}
        for a, b in reversed(groups):
            pieces, sub = _group(cu, a, b, q.device)
            h0_g = _group_states(pieces, cu, cut, h0, True, k, v)
            dht_g = _group_states(pieces, cu, dcut, dht, False, k, v)
            dh0_g = _backward(*(_rows(x, a, b) for x in (q, k, v, beta, g)), h0_g, Tm[a:b], do[a:b], dht_g, scale, sub,
                              [_rows(x, a, b) for x in grads])[-1]
            for i, (n, lo, _) in enumerate(pieces):
                if lo > cu[n]:
                    dcut[(n, lo)] = dh0_g[i]
                elif h0 is not None:
                    dh0[n] = dh0_g[i]
        grads.append(None if h0 is None else torch.stack(dh0))
        return (*grads, None, None, None)


def chunk_delta(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None, *, scale: float,
                initial_state: Tensor | None, output_final_state: bool,
                cu_seqlens: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """deltanet (g None) / gated_deltanet. q, k ``[B, T, H, K]``; v ``[B, T, H, V]``; beta, g ``[B, T, H]``;
    initial_state ``[N, H, K, V]``. Returns ``(o [B, T, H, V], final_state [N, H, K, V] or None)``."""
    B, T, H, _ = q.shape
    V = v.shape[-1]
    meta = chunk_meta(B, T, cu_seqlens, CHUNK, q.device)

    def flat(x):
        return None if x is None else x.reshape(B * T, *x.shape[2:]).contiguous()

    o, ht = DeltaChunk.apply(flat(q), flat(k), flat(v), flat(beta), flat(g), contiguous(initial_state),
                             float(scale), bool(output_final_state), meta)
    return o.view(B, T, H, V), ht
