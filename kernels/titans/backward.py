"""Backward kernels of titans' chunked form (launched by ``TitansChunk.backward`` in ``chunk.py``).

The derivation is in ``kernels/titans/README.md``; buffers and state layout as in ``chunk.py``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .._common import chunk_gram, chunk_start, mm, segment_start, select_rows
from ._shared import (
    _chunk_ahead,
    _cumprod_matrix,
    _cumprod_matrix_t,
    _load_gates,
    _pick,
    _read_rows,
    _states,
)


# ---------------------------------------------------------------------------------------------- backward
@triton.jit
def _bwd_dr_local_kernel(q, k, Dth, do, dr_loc, cu, chunk_indices, scale,
                         H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                         BV: tl.constexpr, IT: tl.constexpr, WT: tl.constexpr, INTERP: tl.constexpr,
                         PREC: tl.constexpr):
    """The outputs' part of the residuals' gradient: ``-scale (Q K^T ∘ Dth)^T do``."""
    i_t, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, L, _ = chunk_start(chunk_indices, cu, i_t, BT)
    o_t = tl.arange(0, BT)
    m_t = o_t < L
    tok = t0 + o_t
    o_v = i_v * BV + tl.arange(0, BV)
    b_AT = chunk_gram(k, q, tok, i_h, m_t, H, K, BT, BK, IT, INTERP, PREC)
    b_AT *= tl.load(Dth + tok[None, :] * H * BT + i_h * BT + o_t[:, None], mask=m_t[None, :], other=0.0)
    p_v = tok[:, None] * H * V + i_h * V + o_v[None, :]
    m_tv = m_t[:, None] & (o_v[None, :] < V)
    b_do = tl.load(do + p_v, mask=m_tv, other=0.0)
    tl.store(dr_loc + p_v, (-scale * mm(b_AT, b_do, WT, INTERP, PREC)).to(dr_loc.dtype.element_ty), mask=m_tv)


@triton.jit
def _bwd_dh_kernel(q, k, Wm, Ws, Wo, r, do, dr_loc, coef, Dth, Lc, wS, scal, dhM, dhS, dhM0, dr, dht, dh0,
                   gpart, cu, chunk_offsets, scale, Ttot,
                   H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                   BV: tl.constexpr, ALIGNED: tl.constexpr, USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
                   WT: tl.constexpr, INTERP: tl.constexpr, PREC: tl.constexpr):
    """Reverse state pass: the full residual gradient ``dr`` of each chunk, the gradients of each
    chunk's end state (float32: ``_bwd_k_kernel`` takes their Frobenius products with the chunk-start
    states), and per-token partial sums (this V block) for the coefficient backward. Only the chain
    through the states runs here: every product with a chunk's inputs feeds a ``tl.dot`` straight from
    its load (scalings go on the [BT, BV] side)."""
    i_nh, i_v = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, Lseg, boh = segment_start(cu, chunk_offsets, i_n)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    o_t = tl.arange(0, BT)
    m_k = o_k < K
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_kv = o_k[:, None] * V + o_v[None, :]
    p_0 = i_nh.to(tl.int64) * 3 * K * V + p_kv
    b_dM, b_dS, b_dM0 = _states(dht, p_0, m_kv, K, V, BK, BV, USE_DHT)
    NT = tl.cdiv(Lseg, BT)
    o_8 = tl.arange(0, 8)
    nx = _chunk_ahead(scal, Dth, Lc, wS, coef, boh + NT - 1, bos, NT - 1, Lseg, i_h, H, BT, True)
    for ii in range(0, NT):
        i_t = NT - 1 - ii
        b_s, b_wM, b_w0, b_wS, b_Aa, b_c = nx
        nx = _chunk_ahead(scal, Dth, Lc, wS, coef, boh + i_t - 1, bos, i_t - 1, Lseg, i_h, H, BT, True)
        i_c = boh + i_t
        p_h = (i_c * H + i_h) * K * V + p_kv
        tl.store(dhM + p_h, b_dM.to(dhM.dtype.element_ty), mask=m_kv)
        tl.store(dhS + p_h, b_dS.to(dhS.dtype.element_ty), mask=m_kv)
        if not ALIGNED:
            tl.store(dhM0 + p_h, b_dM0.to(dhM0.dtype.element_ty), mask=m_kv)
        L = Lseg - i_t * BT
        m_t = o_t < L
        tok = bos + i_t * BT + o_t
        m_tk = m_t[:, None] & m_k[None, :]
        m_kt = m_k[:, None] & m_t[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        p_v = tok[:, None] * H * V + i_h * V + o_v[None, :]
        b_k = tl.load(k + tok[:, None] * H * K + i_h * K + o_k[None, :], mask=m_tk, other=0.0)
        b_r = tl.load(r + p_v, mask=m_tv, other=0.0).to(tl.float32)
        b_kdM = mm(b_k, b_dM, WT, INTERP, PREC)
        b_kdS = mm(b_k, b_dS, WT, INTERP, PREC)
        b_dr = tl.load(dr_loc + p_v, mask=m_tv, other=0.0).to(tl.float32)
        b_dr -= b_wM[:, None] * b_kdM + b_wS[:, None] * b_kdS
        p_g = ((i_v * Ttot + tok) * H + i_h) * 3
        tl.store(gpart + p_g, -tl.sum(b_kdM * b_r, axis=1), mask=m_t)
        tl.store(gpart + p_g + 1, -tl.sum(b_kdS * b_r, axis=1), mask=m_t)
        if ALIGNED:
            has_m0 = ii == 0  # aligned: dM0 is nonzero only at the segment's end
        else:
            has_m0 = ii >= 0
        if has_m0:
            b_kdM0 = mm(b_k, b_dM0, WT, INTERP, PREC)
            b_dr -= b_w0[:, None] * b_kdM0
            tl.store(gpart + p_g + 2, -tl.sum(b_kdM0 * b_r, axis=1), mask=m_t)
        else:
            tl.store(gpart + p_g + 2, tl.zeros([BT], dtype=tl.float32), mask=m_t)
        tl.store(dr + p_v, b_dr.to(dr.dtype.element_ty), mask=m_tv)
        # back to the chunk-start state: (Q ∘ Aa)^T dO as Q^T (Aa ∘ dO)
        p_kT = tok[None, :] * H * K + i_h * K + o_k[:, None]
        b_qT = tl.load(q + p_kT, mask=m_kt, other=0.0)
        b_do = tl.load(do + p_v, mask=m_tv, other=0.0).to(tl.float32) * scale
        b_dMn = (_pick(b_s, o_8, 0) * b_dM + _pick(b_s, o_8, 3) * b_dM0
                 + mm(b_qT, b_do * b_Aa[:, None], WT, INTERP, PREC)
                 + mm(tl.load(Wm + p_kT, mask=m_kt, other=0.0), b_dr, WT, INTERP, PREC))
        b_dSn = (_pick(b_s, o_8, 1) * b_dM + _pick(b_s, o_8, 2) * b_dS + _pick(b_s, o_8, 4) * b_dM0
                 + mm(b_qT, b_do * b_c[:, None], WT, INTERP, PREC)
                 + mm(tl.load(Ws + p_kT, mask=m_kt, other=0.0), b_dr, WT, INTERP, PREC))
        if ALIGNED:
            b_dM0 = tl.zeros([BK, BV], dtype=tl.float32)
        else:
            b_dM0 = (_pick(b_s, o_8, 5) * b_dM0
                     + mm(tl.load(Wo + p_kT, mask=m_kt, other=0.0), b_dr, WT, INTERP, PREC))
        b_dM = b_dMn
        b_dS = b_dSn
    if STORE_DH0:
        tl.store(dh0 + p_0, b_dM, mask=m_kv)
        tl.store(dh0 + p_0 + K * V, b_dS, mask=m_kv)
        tl.store(dh0 + p_0 + 2 * K * V, b_dM0, mask=m_kv)


@triton.jit
def _bwd_v_kernel(q, k, hM, hS, Tm, dr, do, dv, vpart, cu, chunk_indices, scale, Ttot,
                  H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                  BV: tl.constexpr, WT: tl.constexpr, INTERP: tl.constexpr, PREC: tl.constexpr):
    """``dv = -T^T dr`` (= -lambda, the adjoint of the triangular system) and per-token partial sums
    (this V block) of the gradients of Aa, c, alpha', gamma'."""
    i_t, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, L, _ = chunk_start(chunk_indices, cu, i_t, BT)
    o_t = tl.arange(0, BT)
    m_t = o_t < L
    tok = t0 + o_t
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    b_QM = tl.zeros([BT, BV], dtype=tl.float32)
    b_QS = tl.zeros([BT, BV], dtype=tl.float32)
    b_KM = tl.zeros([BT, BV], dtype=tl.float32)
    b_KS = tl.zeros([BT, BV], dtype=tl.float32)
    p_h = (i_t * H + i_h).to(tl.int64) * K * V
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        m_tk = m_t[:, None] & m_k[None, :]
        p_k = tok[:, None] * H * K + i_h * K + o_k[None, :]
        b_q = tl.load(q + p_k, mask=m_tk, other=0.0)
        b_k = tl.load(k + p_k, mask=m_tk, other=0.0)
        p_kv = p_h + o_k[:, None] * V + o_v[None, :]
        m_kv = m_k[:, None] & m_v[None, :]
        b_hM = tl.load(hM + p_kv, mask=m_kv, other=0.0)
        b_hS = tl.load(hS + p_kv, mask=m_kv, other=0.0)
        b_QM += mm(b_q, b_hM, WT, INTERP, PREC)
        b_QS += mm(b_q, b_hS, WT, INTERP, PREC)
        b_KM += mm(b_k, b_hM, WT, INTERP, PREC)
        b_KS += mm(b_k, b_hS, WT, INTERP, PREC)
    p_v = tok[:, None] * H * V + i_h * V + o_v[None, :]
    m_tv = m_t[:, None] & m_v[None, :]
    b_TT = tl.load(Tm + tok[None, :] * H * BT + i_h * BT + o_t[:, None], mask=m_t[None, :], other=0.0)
    b_lam = mm(b_TT, tl.load(dr + p_v, mask=m_tv, other=0.0), WT, INTERP, PREC)
    tl.store(dv + p_v, (-b_lam).to(dv.dtype.element_ty), mask=m_tv)
    b_do = tl.load(do + p_v, mask=m_tv, other=0.0).to(tl.float32)
    p_g = ((i_v * Ttot + tok) * H + i_h) * 4
    tl.store(vpart + p_g, scale * tl.sum(b_QM * b_do, axis=1), mask=m_t)
    tl.store(vpart + p_g + 1, scale * tl.sum(b_QS * b_do, axis=1), mask=m_t)
    tl.store(vpart + p_g + 2, tl.sum(b_KM * b_lam, axis=1), mask=m_t)
    tl.store(vpart + p_g + 3, tl.sum(b_KS * b_lam, axis=1), mask=m_t)


@triton.jit
def _bwd_k_kernel(q, k, r, do, dv, hM, hS, hM0, dhM, dhS, dhM0, dht, coef, Dth, Lc, wS, dq, dk, dR, dL, spart,
                  cu, chunk_indices, scale, MB, NTtot,
                  H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                  BV: tl.constexpr, ALIGNED: tl.constexpr, USE_DHT: tl.constexpr,
                  WT: tl.constexpr, INTERP: tl.constexpr, PREC: tl.constexpr):
    """dq and dk of one chunk and key block; ``dR = do r^T`` and ``dL = dv r^T`` (the gradient of the
    triangular system's matrix) for the coefficient backward, and this key block's part of the
    Frobenius products of the end-state gradients with the chunk-start states (``spart``: <dM, M>,
    <dM, S>, <dS, S>, <dM0, M>, <dM0, S>), from the tiles loaded for dq and dk. Transposed products come
    from transposed loads, never from transposing a matmul result."""
    i_t, i_h, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n = tl.load(chunk_indices + i_t * 2).to(tl.int64)
    t0, L, cpos = chunk_start(chunk_indices, cu, i_t, BT)
    o_t = tl.arange(0, BT)
    m_t = o_t < L
    tok = t0 + o_t
    e = tl.minimum(L, BT) - 1
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    m_tk = m_t[:, None] & m_k[None, :]
    p_coef = (tok * H + i_h) * 4
    b_Aa = tl.load(coef + p_coef, mask=m_t, other=0.0)
    b_c = tl.load(coef + p_coef + 1, mask=m_t, other=0.0)
    b_ap = tl.load(coef + p_coef + 2, mask=m_t, other=0.0)
    b_gp = tl.load(coef + p_coef + 3, mask=m_t, other=0.0)
    b_om = tl.where(_read_rows(cpos, MB, BT) < -1, 1.0, 0.0)
    p_e = (t0 + e) * H * BT + i_h * BT + o_t
    b_wM = tl.load(Dth + p_e, mask=m_t, other=0.0)
    b_w0 = tl.load(Lc + p_e, mask=m_t, other=0.0)
    b_wS = tl.load(wS + tok * H + i_h, mask=m_t, other=0.0)
    p_h = (i_t * H + i_h).to(tl.int64) * K * V
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    b_dR = tl.zeros([BT, BT], dtype=tl.float32)
    b_dRT = tl.zeros([BT, BT], dtype=tl.float32)
    b_dL = tl.zeros([BT, BT], dtype=tl.float32)
    b_dLT = tl.zeros([BT, BT], dtype=tl.float32)
    f_MM = tl.zeros([BK], dtype=tl.float32)
    f_MS = tl.zeros([BK], dtype=tl.float32)
    f_SS = tl.zeros([BK], dtype=tl.float32)
    f_0M = tl.zeros([BK], dtype=tl.float32)
    f_0S = tl.zeros([BK], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        m_tv = m_t[:, None] & m_v[None, :]
        m_vt = m_v[:, None] & m_t[None, :]
        p_v = tok[:, None] * H * V + i_h * V + o_v[None, :]
        p_vT = tok[None, :] * H * V + i_h * V + o_v[:, None]
        b_do = tl.load(do + p_v, mask=m_tv, other=0.0).to(tl.float32)
        b_r = tl.load(r + p_v, mask=m_tv, other=0.0).to(tl.float32)
        b_dv = tl.load(dv + p_v, mask=m_tv, other=0.0).to(tl.float32)
        b_rT = tl.load(r + p_vT, mask=m_vt, other=0.0)
        b_doT = tl.load(do + p_vT, mask=m_vt, other=0.0)
        b_dvT = tl.load(dv + p_vT, mask=m_vt, other=0.0)
        p_hT = p_h + o_k[None, :] * V + o_v[:, None]
        m_vk = m_v[:, None] & m_k[None, :]
        b_hMT = tl.load(hM + p_hT, mask=m_vk, other=0.0).to(tl.float32)
        b_hST = tl.load(hS + p_hT, mask=m_vk, other=0.0).to(tl.float32)
        b_dhMT = tl.load(dhM + p_hT, mask=m_vk, other=0.0).to(tl.float32)
        b_dhST = tl.load(dhS + p_hT, mask=m_vk, other=0.0).to(tl.float32)
        f_MM += tl.sum(b_dhMT * b_hMT, axis=0)
        f_MS += tl.sum(b_dhMT * b_hST, axis=0)
        f_SS += tl.sum(b_dhST * b_hST, axis=0)
        b_dq += mm(b_do * b_Aa[:, None], b_hMT, WT, INTERP, PREC) + mm(b_do * b_c[:, None], b_hST, WT, INTERP, PREC)
        b_dk -= mm(b_dv * b_ap[:, None], b_hMT, WT, INTERP, PREC) + mm(b_dv * b_gp[:, None], b_hST, WT, INTERP, PREC)
        b_dk -= mm(b_r * b_wM[:, None], b_dhMT, WT, INTERP, PREC)
        b_dk -= mm(b_r * b_wS[:, None], b_dhST, WT, INTERP, PREC)
        if not ALIGNED:
            b_dhM0T = tl.load(dhM0 + p_hT, mask=m_vk, other=0.0).to(tl.float32)
            f_0M += tl.sum(b_dhM0T * b_hMT, axis=0)
            f_0S += tl.sum(b_dhM0T * b_hST, axis=0)
            b_dk -= mm(b_dv * b_om[:, None], tl.load(hM0 + p_hT, mask=m_vk, other=0.0), WT, INTERP, PREC)
            b_dk -= mm(b_r * b_w0[:, None], b_dhM0T, WT, INTERP, PREC)
        if ALIGNED and USE_DHT:  # noqa: SIM102 (a constexpr test, then a runtime one)
            if L <= BT:  # aligned: only the segment's last chunk sees the final state's dM0
                p_dT = (i_n * H + i_h) * 3 * K * V + 2 * K * V + o_k[None, :] * V + o_v[:, None]
                b_dhM0T = tl.load(dht + p_dT, mask=m_vk, other=0.0)
                f_0M += tl.sum(b_dhM0T * b_hMT, axis=0)
                f_0S += tl.sum(b_dhM0T * b_hST, axis=0)
                b_dk -= mm(b_r * b_w0[:, None], b_dhM0T, WT, INTERP, PREC)
        b_dR += mm(b_do, b_rT, WT, INTERP, PREC)
        b_dRT += mm(b_r, b_doT, WT, INTERP, PREC)
        b_dL += mm(b_dv, b_rT, WT, INTERP, PREC)
        b_dLT += mm(b_r, b_dvT, WT, INTERP, PREC)
    p_k = tok[:, None] * H * K + i_h * K + o_k[None, :]
    b_q = tl.load(q + p_k, mask=m_tk, other=0.0)
    b_k = tl.load(k + p_k, mask=m_tk, other=0.0)
    p_row = tok[:, None] * H * BT + i_h * BT + o_t[None, :]
    p_col = tok[None, :] * H * BT + i_h * BT + o_t[:, None]
    b_Dth = tl.load(Dth + p_row, mask=m_t[:, None], other=0.0)
    b_DthT = tl.load(Dth + p_col, mask=m_t[None, :], other=0.0)
    b_Lc = tl.load(Lc + p_row, mask=m_t[:, None], other=0.0)
    b_LcT = tl.load(Lc + p_col, mask=m_t[None, :], other=0.0)
    strict = o_t[:, None] > o_t[None, :]
    b_dKK = tl.where(strict, b_dL * b_Lc, 0.0) + tl.where(strict, 0.0, b_dLT * b_LcT)
    b_dq = scale * (b_dq - mm(b_dR * b_Dth, b_k, WT, INTERP, PREC))
    b_dk += mm(b_dKK, b_k, WT, INTERP, PREC) - scale * mm(b_dRT * b_DthT, b_q, WT, INTERP, PREC)
    tl.store(dq + p_k, b_dq.to(dq.dtype.element_ty), mask=m_tk)
    tl.store(dk + p_k, b_dk.to(dk.dtype.element_ty), mask=m_tk)
    if i_k == 0:
        tl.store(dR + p_row, b_dR, mask=m_t[:, None])
        tl.store(dL + p_row, b_dL, mask=m_t[:, None])
    p_sp = ((i_k * NTtot + i_t) * H + i_h) * 8
    tl.store(spart + p_sp, tl.sum(f_MM, axis=0))
    tl.store(spart + p_sp + 1, tl.sum(f_MS, axis=0))
    tl.store(spart + p_sp + 2, tl.sum(f_SS, axis=0))
    tl.store(spart + p_sp + 3, tl.sum(f_0M, axis=0))
    tl.store(spart + p_sp + 4, tl.sum(f_0S, axis=0))


@triton.jit
def _coef_bwd_kernel(q, k, theta, alpha, eta, dR, dL, vpart, gpart, spart, dtheta, dalpha, deta,
                     cu, chunk_indices, scale, MB, Ttot, NTtot,
                     H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, NVP: tl.constexpr,
                     NVS: tl.constexpr, NKS: tl.constexpr, IT: tl.constexpr, INTERP: tl.constexpr, PREC: tl.constexpr):
    """Back from the chunk's coefficients (Dth, Lc, Aa, c, alpha', gamma', the end-state weights) to
    theta, alpha and eta, in log space: the gradient of a cumulative product over ``(s, t]`` with
    respect to ``log x_r`` is the product itself for ``s < r <= t`` (README, "gate gradients")."""
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    t0, L, cpos = chunk_start(chunk_indices, cu, i_t, BT)
    o_t = tl.arange(0, BT)
    m_t = o_t < L
    tok = t0 + o_t
    e = tl.minimum(L, BT) - 1
    is_e = o_t == e
    row_e = o_t[:, None] == e
    b_theta, b_a, b_eta = _load_gates(theta, alpha, eta, tok, i_h, m_t, H)
    p = _read_rows(cpos, MB, BT)
    sel_T = o_t[:, None] == p[None, :]  # [p, j]: token j reads the memory at p
    # the [BT, BT] tiles are built where they are first needed, so that few are live at once
    b_QK = tl.zeros([BT, BT], dtype=tl.float32)
    b_KK = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        m_tk = m_t[:, None] & m_k[None, :]
        m_kt = m_k[:, None] & m_t[None, :]
        b_kT = tl.load(k + tok[None, :] * H * K + i_h * K + o_k[:, None], mask=m_kt, other=0.0)
        b_QK += mm(tl.load(q + tok[:, None] * H * K + i_h * K + o_k[None, :], mask=m_tk, other=0.0), b_kT, IT,
                   INTERP, PREC)
        b_KK += mm(tl.load(k + tok[:, None] * H * K + i_h * K + o_k[None, :], mask=m_tk, other=0.0), b_kT, IT,
                   INTERP, PREC)
    p_row = tok[:, None] * H * BT + i_h * BT + o_t[None, :]
    lower = o_t[:, None] >= o_t[None, :]
    g_Dth = tl.where(lower, -scale * tl.load(dR + p_row, mask=m_t[:, None], other=0.0) * b_QK, 0.0)
    g_Lc = tl.where(o_t[:, None] > o_t[None, :], tl.load(dL + p_row, mask=m_t[:, None], other=0.0) * b_KK, 0.0)
    g_Aa = tl.zeros([BT], dtype=tl.float32)
    g_c = tl.zeros([BT], dtype=tl.float32)
    g_ap = tl.zeros([BT], dtype=tl.float32)
    g_gp = tl.zeros([BT], dtype=tl.float32)
    g_wM = tl.zeros([BT], dtype=tl.float32)
    g_wS = tl.zeros([BT], dtype=tl.float32)
    g_w0 = tl.zeros([BT], dtype=tl.float32)
    s_Aa = 0.0
    s_c = 0.0
    s_Ee = 0.0
    s_ap = 0.0
    s_gp = 0.0
    for i_v in tl.static_range(NVP):  # per-token parts of _bwd_v_kernel
        p_vp = ((i_v * Ttot + tok) * H + i_h) * 4
        g_Aa += tl.load(vpart + p_vp, mask=m_t, other=0.0)
        g_c += tl.load(vpart + p_vp + 1, mask=m_t, other=0.0)
        g_ap += tl.load(vpart + p_vp + 2, mask=m_t, other=0.0)
        g_gp += tl.load(vpart + p_vp + 3, mask=m_t, other=0.0)
    for i_v in tl.static_range(NVS):  # per-token parts of _bwd_dh_kernel
        p_gp = ((i_v * Ttot + tok) * H + i_h) * 3
        g_wM += tl.load(gpart + p_gp, mask=m_t, other=0.0)
        g_wS += tl.load(gpart + p_gp + 1, mask=m_t, other=0.0)
        g_w0 += tl.load(gpart + p_gp + 2, mask=m_t, other=0.0)
    for i_k in tl.static_range(NKS):  # per-chunk parts of _bwd_k_kernel
        p_sp = ((i_k * NTtot + i_t) * H + i_h) * 8
        s_Aa += tl.load(spart + p_sp)
        s_c += tl.load(spart + p_sp + 1)
        s_Ee += tl.load(spart + p_sp + 2)
        s_ap += tl.load(spart + p_sp + 3)
        s_gp += tl.load(spart + p_sp + 4)
    # the end-state coefficients are entries of the per-token ones
    g_Lc += tl.where(row_e, g_w0[None, :], 0.0)
    g_ap += tl.where(is_e, s_ap, 0.0)
    g_gp += tl.where(is_e, s_gp, 0.0)
    g_Dth += tl.where(row_e, g_wM[None, :], 0.0)
    g_Dth += select_rows(sel_T, g_Lc, INTERP, 3)  # Lc = rows p[j] of Dth: summed back
    g_Dth = tl.where(lower, g_Dth, 0.0)
    g_Aa += tl.sum(tl.where(sel_T, g_ap[None, :], 0.0), axis=1) + tl.where(is_e, s_Aa, 0.0)
    g_c += tl.sum(tl.where(sel_T, g_gp[None, :], 0.0), axis=1) + tl.where(is_e, s_c, 0.0)
    b_Aa = tl.cumprod(b_a, axis=0)
    b_Ee = tl.cumprod(b_eta, axis=0)
    g_Ee = tl.where(is_e, s_Ee, 0.0)
    b_Pa = _cumprod_matrix(b_a, BT)
    b_Pe = _cumprod_matrix(b_eta, BT)
    b_D = tl.dot(b_Pa, b_Pe, input_precision=PREC)
    b_Pe_e = tl.sum(tl.where(row_e, b_Pe, 0.0), axis=0)
    b_dtheta = tl.sum(g_Dth * b_D, axis=0) + g_wS * b_Pe_e
    g_D = g_Dth * b_theta[None, :]
    g_Pe = tl.where(lower, tl.dot(_cumprod_matrix_t(b_a, BT), g_D, input_precision=PREC), 0.0)
    g_Pe += tl.where(row_e, (g_wS * b_theta)[None, :], 0.0)
    g_Pa = tl.dot(g_D, _cumprod_matrix_t(b_eta, BT), input_precision=PREC)
    g_Pa = tl.where(lower, g_Pa + g_c[:, None] * b_Ee[None, :], 0.0)
    g_Ee += tl.sum(b_Pa * g_c[:, None], axis=0)
    # d/dlog x_r of P[t, s] is P[t, s] for s < r <= t: rectangle sums of (gP ∘ P)
    # sum over s < r by a product with the strictly upper triangle: a prefix sum minus the current
    # term would cancel the terms that carry the factor x_r (all others) against one that does not
    upper = tl.where(o_t[:, None] < o_t[None, :], 1.0, 0.0)
    C_a = tl.dot(g_Pa * b_Pa, upper, input_precision=PREC)
    C_e = tl.dot(g_Pe * b_Pe, upper, input_precision=PREC)
    dla = tl.sum(tl.where(lower, C_a, 0.0), axis=0) + tl.cumsum(g_Aa * b_Aa, axis=0, reverse=True)
    dle = tl.sum(tl.where(lower, C_e, 0.0), axis=0) + tl.cumsum(g_Ee * b_Ee, axis=0, reverse=True)
    tl.store(dtheta + tok * H + i_h, b_dtheta.to(dtheta.dtype.element_ty), mask=m_t)
    tl.store(dalpha + tok * H + i_h, (-dla / b_a).to(dalpha.dtype.element_ty), mask=m_t)
    tl.store(deta + tok * H + i_h, (dle / b_eta).to(deta.dtype.element_ty), mask=m_t)
