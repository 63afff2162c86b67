"""Chunked forward and backward of titans (linear memory, mini-batch gradient descent with momentum).

Per token, with ``M0`` the memory before the token's mini-batch::

    r_t = M0^T k_t - v_t;   S_t = eta_t S_{t-1} - theta_t k_t r_t^T;   M_t = a_t M_{t-1} + S_t;   o_t = scale M_t^T q_t

with ``a = 1 - alpha``. Chunks are 64 tokens whatever ``mini_batch`` is: a mini-batch that started
before the chunk reads the carried ``M0`` (state slot 2). Inside a chunk every memory that a token
reads is ``Aa M_s + c S_s - sum D theta k r^T`` of the chunk-start state, so the residuals ``r`` solve
one unit lower-triangular system ``(I + Lc ∘ K K^T) r = rhs`` (the delta rule's UT form), and the
outputs and end states are linear in ``r``. Derivation and the backward: ``kernels/titans/README.md``.

Buffers per token (packed ``[Ttot, H, *]``, float32): ``T`` (the inverse), ``Dth`` (``D ∘ theta``), ``Lc``
(rows of ``Dth`` at the memory each token reads), ``coef`` = (Aa, c, alpha', gamma'), ``wS``; per chunk
``scal`` = (Aa_e, c_e, Ee_e, alpha'_e, gamma'_e, omega_e) at the chunk's last real token e.
States ``[N, H, 3, K, V]`` = (M, S, M0), float32.
"""

from __future__ import annotations

import re

import torch
import triton
import triton.language as tl

from .._common import (
    CHUNK,
    _is_hopper,
    chunk_gram,
    chunk_meta,
    chunk_start,
    contiguous,
    dot_precision,
    dots,
    is_interpreting,
    launch,
    mm,
    pow2,
    segment_start,
    state_stages,
    work_dtype,
)
from ..delta.chunk import unit_lower_inverse
from ._shared import _chunk_ahead, _cumprod_matrix, _load_gates, _pick, _read_rows, _states
from .backward import _bwd_dh_kernel, _bwd_dr_local_kernel, _bwd_k_kernel, _bwd_v_kernel, _coef_bwd_kernel

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------- forward
@triton.jit
def _coef_kernel(theta, alpha, eta, Dth, Lc, coef, wS, scal, cu, chunk_indices, MB,
                 H: tl.constexpr, BT: tl.constexpr, INTERP: tl.constexpr, PREC: tl.constexpr):
    """The chunk's coefficients, from the gates alone: ``Dth``, ``Lc``, ``coef``, ``wS`` and the
    per-chunk scalars ``scal``. A kernel of its own, with only [BT, BT] tiles: fused into
    ``_prep_kernel`` it took that kernel to 255 registers with spills (268 us against 161 + 92 us, H100)."""
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    t0, L, cpos = chunk_start(chunk_indices, cu, i_t, BT)
    o_t = tl.arange(0, BT)
    m_t = o_t < L
    tok = t0 + o_t
    e = tl.minimum(L, BT) - 1
    p = _read_rows(cpos, MB, BT)
    p_row = tok[:, None] * H * BT + i_h * BT + o_t[None, :]
    p_coef = (tok * H + i_h) * 4
    b_theta, b_a, b_eta = _load_gates(theta, alpha, eta, tok, i_h, m_t, H)
    b_Aa = tl.cumprod(b_a, axis=0)
    b_Ee = tl.cumprod(b_eta, axis=0)
    b_Pe = _cumprod_matrix(b_eta, BT)
    tl.store(wS + tok * H + i_h, tl.sum(tl.where(o_t[:, None] == e, b_Pe, 0.0), axis=0) * b_theta, mask=m_t)
    b_Pa = _cumprod_matrix(b_a, BT)
    b_c = tl.sum(b_Pa * b_Ee[None, :], axis=1)
    b_Dth = tl.dot(b_Pa, b_Pe, input_precision=PREC) * b_theta[None, :]
    sel = p[:, None] == o_t[None, :]
    idx = tl.maximum(p, 0)[:, None] + 0 * o_t[None, :]
    b_Lc = tl.where((p >= 0)[:, None], tl.gather(b_Dth, idx, axis=0), 0.0)  # rows p[j] of Dth
    b_ap = tl.sum(tl.where(sel, b_Aa[None, :], 0.0), axis=1) + tl.where(p == -1, 1.0, 0.0)
    b_gp = tl.sum(tl.where(sel, b_c[None, :], 0.0), axis=1)
    tl.store(Dth + p_row, b_Dth, mask=m_t[:, None])
    tl.store(Lc + p_row, b_Lc, mask=m_t[:, None])
    tl.store(coef + p_coef, b_Aa, mask=m_t)
    tl.store(coef + p_coef + 1, b_c, mask=m_t)
    tl.store(coef + p_coef + 2, b_ap, mask=m_t)
    tl.store(coef + p_coef + 3, b_gp, mask=m_t)
    p_s = (i_t * H + i_h).to(tl.int64) * 8
    tl.store(scal + p_s, _pick(b_Aa, o_t, e))
    tl.store(scal + p_s + 1, _pick(b_c, o_t, e))
    tl.store(scal + p_s + 2, _pick(b_Ee, o_t, e))
    tl.store(scal + p_s + 3, _pick(b_ap, o_t, e))
    tl.store(scal + p_s + 4, _pick(b_gp, o_t, e))
    tl.store(scal + p_s + 5, _pick(tl.where(p < -1, 1.0, 0.0), o_t, e))


@triton.jit
def _prep_kernel(k, v, Lc, coef, Tm, Wm, Ws, Wo, U0, cu, chunk_indices, MB,
                 H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                 BV: tl.constexpr, ALIGNED: tl.constexpr, STORE_T: tl.constexpr,
                 IT: tl.constexpr, WT: tl.constexpr, INTERP: tl.constexpr, PREC: tl.constexpr):
    """The inverse ``T = (I + Lc ∘ K K^T)^{-1}``, ``W* = T diag(alpha' | gamma' | omega) K`` and
    ``U0 = T V`` of one chunk (the delta rule's UT form), from the coefficients of ``_coef_kernel``.
    ``T`` itself is stored only for the backward (STORE_T)."""
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    t0, L, cpos = chunk_start(chunk_indices, cu, i_t, BT)
    o_t = tl.arange(0, BT)
    m_t = o_t < L
    tok = t0 + o_t
    p_row = tok[:, None] * H * BT + i_h * BT + o_t[None, :]
    p_coef = (tok * H + i_h) * 4
    b_Lc = tl.load(Lc + p_row, mask=m_t[:, None], other=0.0)
    b_ap = tl.load(coef + p_coef + 2, mask=m_t, other=0.0)
    b_gp = tl.load(coef + p_coef + 3, mask=m_t, other=0.0)
    b_KK = chunk_gram(k, k, tok, i_h, m_t, H, K, BT, BK, IT, INTERP, PREC)
    b_L = tl.where(o_t[:, None] > o_t[None, :], b_Lc * b_KK, 0.0)
    b_T = unit_lower_inverse(b_L, BT, PREC)
    # T diag(x) K as (T ∘ x^T) K: the key tile feeds the product straight from its load, and the
    # scaled inverses are kept in the work dtype (the products round them to it anyway)
    b_Ta = (b_T * b_ap[None, :]).to(WT)
    b_Tg = (b_T * b_gp[None, :]).to(WT)
    if not ALIGNED:
        b_To = (b_T * tl.where(_read_rows(cpos, MB, BT) < -1, 1.0, 0.0)[None, :]).to(WT)
    b_T = b_T.to(WT)
    if STORE_T:  # in the work dtype: its one reader, dv = -T^T dr, rounds it to that
        tl.store(Tm + p_row, b_T, mask=m_t[:, None])
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_tk = m_t[:, None] & (o_k[None, :] < K)
        p_k = tok[:, None] * H * K + i_h * K + o_k[None, :]
        b_k = tl.load(k + p_k, mask=m_tk, other=0.0)
        tl.store(Wm + p_k, mm(b_Ta, b_k, WT, INTERP, PREC).to(Wm.dtype.element_ty), mask=m_tk)
        tl.store(Ws + p_k, mm(b_Tg, b_k, WT, INTERP, PREC).to(Ws.dtype.element_ty), mask=m_tk)
        if not ALIGNED:
            tl.store(Wo + p_k, mm(b_To, b_k, WT, INTERP, PREC).to(Wo.dtype.element_ty), mask=m_tk)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v[None, :] < V)
        p_v = tok[:, None] * H * V + i_h * V + o_v[None, :]
        b_v = tl.load(v + p_v, mask=m_tv, other=0.0)
        tl.store(U0 + p_v, mm(b_T, b_v, WT, INTERP, PREC).to(U0.dtype.element_ty), mask=m_tv)


@triton.jit
def _fwd_h_kernel(k, Wm, Ws, Wo, U0, Dth, Lc, wS, scal, hM, hS, hM0, r, h0, ht, cu, chunk_offsets,
                  H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                  BV: tl.constexpr, ALIGNED: tl.constexpr, USE_H0: tl.constexpr, STORE_HT: tl.constexpr,
                  WT: tl.constexpr, INTERP: tl.constexpr, PREC: tl.constexpr):
    """State pass over one segment (all of K, a block of V): residuals ``r = W [M; S; M0] - U0`` per
    chunk, then the state at the chunk's last real token. Stores the chunk-start states and ``r``.
    The updates ``(K ∘ w)^T r`` are taken as ``K^T (w ∘ r)``: the key tile feeds the product straight from
    its load and the scaling goes on the smaller [BT, BV] side."""
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
    b_M, b_S, b_M0 = _states(h0, p_0, m_kv, K, V, BK, BV, USE_H0)
    NT = tl.cdiv(Lseg, BT)
    o_8 = tl.arange(0, 8)
    nx = _chunk_ahead(scal, Dth, Lc, wS, None, boh, bos, 0, Lseg, i_h, H, BT, False)
    nx_u = tl.load(U0 + (bos + o_t[:, None]) * H * V + i_h * V + o_v[None, :],
                   mask=(o_t[:, None] < Lseg) & m_v[None, :], other=0.0)
    for i_t in range(0, NT):
        b_s, b_wM, b_w0, b_wS, _, _ = nx
        b_u = nx_u
        nx = _chunk_ahead(scal, Dth, Lc, wS, None, boh + i_t + 1, bos, i_t + 1, Lseg, i_h, H, BT, False)
        p_n = (bos + (i_t + 1) * BT + o_t[:, None]) * H * V + i_h * V + o_v[None, :]
        nx_u = tl.load(U0 + p_n, mask=((i_t + 1) * BT + o_t[:, None] < Lseg) & m_v[None, :], other=0.0)
        i_c = boh + i_t
        p_h = (i_c * H + i_h) * K * V + p_kv
        tl.store(hM + p_h, b_M.to(hM.dtype.element_ty), mask=m_kv)
        tl.store(hS + p_h, b_S.to(hS.dtype.element_ty), mask=m_kv)
        if not ALIGNED:
            tl.store(hM0 + p_h, b_M0.to(hM0.dtype.element_ty), mask=m_kv)
        L = Lseg - i_t * BT
        m_t = o_t < L
        tok = bos + i_t * BT + o_t
        m_tk = m_t[:, None] & m_k[None, :]
        p_k = tok[:, None] * H * K + i_h * K + o_k[None, :]
        p_v = tok[:, None] * H * V + i_h * V + o_v[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        b_r = mm(tl.load(Wm + p_k, mask=m_tk, other=0.0), b_M, WT, INTERP, PREC)
        b_r += mm(tl.load(Ws + p_k, mask=m_tk, other=0.0), b_S, WT, INTERP, PREC)
        if not ALIGNED:
            b_r += mm(tl.load(Wo + p_k, mask=m_tk, other=0.0), b_M0, WT, INTERP, PREC)
        b_r -= b_u.to(tl.float32)
        tl.store(r + p_v, b_r.to(r.dtype.element_ty), mask=m_tv)
        b_kT = tl.load(k + tok[None, :] * H * K + i_h * K + o_k[:, None], mask=m_k[:, None] & m_t[None, :],
                       other=0.0)
        if ALIGNED:
            upd_m0 = i_t == NT - 1  # aligned: M0 is only read back from the final state
        else:
            upd_m0 = i_t >= 0
        if upd_m0:
            b_M0 = (_pick(b_s, o_8, 3) * b_M + _pick(b_s, o_8, 4) * b_S + _pick(b_s, o_8, 5) * b_M0
                    - mm(b_kT, b_r * b_w0[:, None], WT, INTERP, PREC))
        b_Mn = _pick(b_s, o_8, 0) * b_M + _pick(b_s, o_8, 1) * b_S - mm(b_kT, b_r * b_wM[:, None], WT, INTERP, PREC)
        b_S = _pick(b_s, o_8, 2) * b_S - mm(b_kT, b_r * b_wS[:, None], WT, INTERP, PREC)
        b_M = b_Mn
    if STORE_HT:
        tl.store(ht + p_0, b_M, mask=m_kv)
        tl.store(ht + p_0 + K * V, b_S, mask=m_kv)
        tl.store(ht + p_0 + 2 * K * V, b_M0, mask=m_kv)


@triton.jit
def _fwd_o_kernel(q, k, hM, hS, r, Dth, coef, o, cu, chunk_indices, scale,
                  H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                  BV: tl.constexpr, IT: tl.constexpr, WT: tl.constexpr, INTERP: tl.constexpr, PREC: tl.constexpr):
    """``o = scale (Aa ∘ Q M_s + c ∘ Q S_s - (Q K^T ∘ Dth) r)`` per chunk."""
    i_t, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, L, _ = chunk_start(chunk_indices, cu, i_t, BT)
    o_t = tl.arange(0, BT)
    m_t = o_t < L
    tok = t0 + o_t
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    b_oM = tl.zeros([BT, BV], dtype=tl.float32)
    b_oS = tl.zeros([BT, BV], dtype=tl.float32)
    b_A = tl.zeros([BT, BT], dtype=tl.float32)
    p_h = (i_t * H + i_h).to(tl.int64) * K * V
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_q = tl.load(q + tok[:, None] * H * K + i_h * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_kT = tl.load(k + tok[None, :] * H * K + i_h * K + o_k[:, None], mask=m_k[:, None] & m_t[None, :], other=0.0)
        p_kv = p_h + o_k[:, None] * V + o_v[None, :]
        m_kv = m_k[:, None] & m_v[None, :]
        b_oM += mm(b_q, tl.load(hM + p_kv, mask=m_kv, other=0.0), WT, INTERP, PREC)
        b_oS += mm(b_q, tl.load(hS + p_kv, mask=m_kv, other=0.0), WT, INTERP, PREC)
        b_A += mm(b_q, b_kT, IT, INTERP, PREC)
    b_Aa = tl.load(coef + (tok * H + i_h) * 4, mask=m_t, other=0.0)
    b_c = tl.load(coef + (tok * H + i_h) * 4 + 1, mask=m_t, other=0.0)
    b_A *= tl.load(Dth + tok[:, None] * H * BT + i_h * BT + o_t[None, :], mask=m_t[:, None], other=0.0)
    p_v = tok[:, None] * H * V + i_h * V + o_v[None, :]
    m_tv = m_t[:, None] & m_v[None, :]
    b_r = tl.load(r + p_v, mask=m_tv, other=0.0)
    b_o = b_Aa[:, None] * b_oM + b_c[:, None] * b_oS - mm(b_A, b_r, WT, INTERP, PREC)
    tl.store(o + p_v, (b_o * scale).to(o.dtype.element_ty), mask=m_tv)


# ---------------------------------------------------------------------------------------------- launchers
def _prep(k, v, theta, alpha, eta, mb, meta, store_t):
    """The chunk coefficients ``(Tm, Dth, Lc, coef, wS, scal)`` and ``(Wm, Ws, Wo, U0)``; ``Tm`` (the
    inverse, read only by the backward) is None unless ``store_t``."""
    Ttot, H, K = k.shape
    V = v.shape[-1]
    f32 = torch.float32
    wdt = work_dtype(k.dtype)
    aligned = CHUNK % mb == 0
    Dth, Lc = (k.new_empty(Ttot, H, CHUNK, dtype=f32) for _ in range(2))
    Tm = k.new_empty(Ttot, H, CHUNK, dtype=wdt) if store_t else None
    coef = k.new_empty(Ttot, H, 4, dtype=f32)
    wS = k.new_empty(Ttot, H, dtype=f32)
    scal = k.new_zeros(meta.num_chunks, H, 8, dtype=f32)
    _coef_kernel[(meta.num_chunks, H)](theta, alpha, eta, Dth, Lc, coef, wS, scal, meta.cu, meta.chunk_indices, mb,
                                       H=H, BT=CHUNK, INTERP=is_interpreting(), PREC=dot_precision(k.dtype),
                                       **launch("titans.coef", num_warps=2))  # 92 -> 80 us against 4 warps (H100)
    Wm, Ws = k.new_empty(Ttot, H, K, dtype=wdt), k.new_empty(Ttot, H, K, dtype=wdt)
    Wo = None if aligned else k.new_empty(Ttot, H, K, dtype=wdt)
    U0 = k.new_empty(Ttot, H, V, dtype=wdt)
    _prep_kernel[(meta.num_chunks, H)](k, v, Lc, coef, Tm, Wm, Ws, Wo, U0, meta.cu, meta.chunk_indices, mb, H=H, K=K,
                                       V=V, BT=CHUNK, BK=min(64, pow2(K)), BV=min(64, pow2(V)), ALIGNED=aligned,
                                       STORE_T=store_t, **dots(k.dtype), **launch("titans.prep", num_warps=4))
    return (Tm, Dth, Lc, coef, wS, scal), (Wm, Ws, Wo, U0)


def _state_bv(BK: int, V: int) -> int:
    return min(pow2(V), 32 if BK <= 64 else 16)


def _fwd_h(k, W, coefs, h0, output_final_state, mb, meta, state_dtype=None):
    """Chunk-start states, residuals and the final state. ``state_dtype``: of the stored chunk states
    (default the work dtype; the backward keeps them in float32, see below)."""
    Wm, Ws, Wo, U0 = W
    _, Dth, Lc, _, wS, scal = coefs
    H, K = k.shape[1:]
    V = U0.shape[-1]
    N = meta.num_segments
    aligned = Wo is None
    BK = pow2(K)
    BV = _state_bv(BK, V)
    sdt = state_dtype or U0.dtype
    hM, hS = (k.new_empty(meta.num_chunks, H, K, V, dtype=sdt) for _ in range(2))
    hM0 = None if aligned else k.new_empty(meta.num_chunks, H, K, V, dtype=sdt)
    r = torch.empty_like(U0)
    ht = k.new_empty(N, H, 3, K, V, dtype=torch.float32) if output_final_state else None
    _fwd_h_kernel[(N * H, triton.cdiv(V, BV))](k, Wm, Ws, Wo, U0, Dth, Lc, wS, scal, hM, hS, hM0, r, h0, ht, meta.cu,
                                               meta.chunk_offsets, H=H, K=K, V=V, BT=CHUNK, BK=BK, BV=BV,
                                               ALIGNED=aligned, USE_H0=h0 is not None,
                                               STORE_HT=output_final_state, **dots(k.dtype, False),
                                                   **launch("titans.fwd_h", num_stages=state_stages(BK, U0.dtype)))
    return hM, hS, hM0, r, ht


class TitansChunk(torch.autograd.Function):
    """``(o, final_state)`` of titans on packed input ``[Ttot, H, *]``."""

    @staticmethod
    def forward(ctx, q, k, v, theta, alpha, eta, h0, scale, mb, output_final_state, meta):
        Ttot, H, K = q.shape
        V = v.shape[-1]
        coefs, W = _prep(k, v, theta, alpha, eta, mb, meta, store_t=any(ctx.needs_input_grad))
        hM, hS, _, r, ht = _fwd_h(k, W, coefs, h0, output_final_state, mb, meta)
        _, Dth, _, coef, _, _ = coefs
        o = v.new_empty(Ttot, H, V)
        # bf16: 128-wide value blocks, Q K^T and Dth once per chunk (151 -> 128 us, H100); float32
        # states would take three stages of such tiles past Hopper's shared memory
        BV = min(128 if hM.dtype == torch.bfloat16 else 64, pow2(V))
        BKo = pow2(K) if BV == 128 and K <= 128 else min(64, pow2(K))  # one key block: 127 -> 119 us (H100)
        _fwd_o_kernel[(meta.num_chunks, H, triton.cdiv(V, BV))](q, k, hM, hS, r, Dth, coef, o, meta.cu,
                                                                meta.chunk_indices, scale, H=H, K=K, V=V, BT=CHUNK,
                                                                BK=BKo, BV=BV, **dots(q.dtype),
                                                                    **launch("titans.fwd_o"))
        # W and U0 are kept for the backward (bf16 at bf16 inputs), which then only recomputes the states
        ctx.save_for_backward(q, k, v, theta, alpha, eta, h0, *coefs, *W)
        ctx.scale, ctx.mb, ctx.meta = scale, mb, meta
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, theta, alpha, eta, h0, *saved = ctx.saved_tensors
        coefs, W = tuple(saved[:6]), tuple(saved[6:])
        scale, mb, meta = ctx.scale, ctx.mb, ctx.meta
        Ttot, H, K = q.shape
        V = v.shape[-1]
        N, NT = meta.num_segments, meta.num_chunks
        f32 = torch.float32
        do = do.contiguous()
        dht = contiguous(dht)
        # chunk states in float32: the gate gradients take Frobenius products <dM_e, M_s> of them, sums
        # of K * V terms that bf16 states would swamp when the memory grows (no forgetting, eta ~ 1)
        hM, hS, hM0, r, _ = _fwd_h(k, W, coefs, h0, False, mb, meta, state_dtype=torch.float32)
        Tm, Dth, Lc, coef, wS, scal = coefs
        Wm, Ws, Wo, U0 = W
        aligned = Wo is None
        BKc, BVc = min(64, pow2(K)), min(64, pow2(V))
        NVc = triton.cdiv(V, BVc)
        kw = dict(H=H, K=K, V=V, BT=CHUNK)

        dr_loc = torch.empty_like(U0)
        _bwd_dr_local_kernel[(NT, H, NVc)](q, k, Dth, do, dr_loc, meta.cu, meta.chunk_indices, scale, BK=BKc, BV=BVc,
                                           **kw, **dots(q.dtype), **launch("titans.bwd_dr_local"))

        BK = pow2(K)
        BV = _state_bv(BK, V)
        NV = triton.cdiv(V, BV)
        # end-state gradients in float32, like the states: _bwd_k_kernel takes their Frobenius products
        dhM, dhS = (q.new_empty(NT, H, K, V, dtype=f32) for _ in range(2))
        dhM0 = None if aligned else q.new_empty(NT, H, K, V, dtype=f32)
        dr = torch.empty_like(U0)
        dh0 = q.new_empty(N, H, 3, K, V, dtype=f32) if h0 is not None else None
        gpart = q.new_empty(NV, Ttot, H, 3, dtype=f32)
        _bwd_dh_kernel[(N * H, NV)](q, k, Wm, Ws, Wo, r, do, dr_loc, coef, Dth, Lc, wS, scal, dhM, dhS, dhM0,
                                    dr, dht, dh0, gpart, meta.cu, meta.chunk_offsets, scale, Ttot, BK=BK,
                                    BV=BV, ALIGNED=aligned, USE_DHT=dht is not None, STORE_DH0=h0 is not None, **kw,
                                    **dots(q.dtype, False),
                                        **launch("titans.bwd_dh", num_stages=state_stages(BK, U0.dtype)))

        dv = v.new_empty(v.shape)
        vpart = q.new_empty(NVc, Ttot, H, 4, dtype=f32)
        _bwd_v_kernel[(NT, H, NVc)](q, k, hM, hS, Tm, dr, do, dv, vpart, meta.cu, meta.chunk_indices, scale, Ttot,
                                    BK=BKc, BV=BVc, **kw, **dots(q.dtype, False),
                                    **launch("titans.bwd_v", num_stages=1))

        dq, dk = q.new_empty(q.shape), k.new_empty(k.shape)
        dR, dL = (q.new_empty(Ttot, H, CHUNK, dtype=f32) for _ in range(2))
        stages = 3 if U0.dtype == torch.bfloat16 else 1  # 490 us against 916 us at 1 (H200, gpu_debug --tune)
        NKc = triton.cdiv(K, BKc)
        spart = q.new_empty(NKc, NT, H, 8, dtype=f32)
        _bwd_k_kernel[(NT, H, NKc)](q, k, r, do, dv, hM, hS, hM0, dhM, dhS, dhM0, dht, coef, Dth, Lc, wS, dq, dk, dR,
                                    dL, spart, meta.cu, meta.chunk_indices, scale, mb, NT, BK=BKc, BV=min(32, BVc),
                                    ALIGNED=aligned, USE_DHT=dht is not None, **kw, **dots(q.dtype, False),
                                    **launch("titans.bwd_k", num_warps=8, num_stages=stages))

        dtheta, dalpha, deta = (x.new_empty(x.shape) for x in (theta, alpha, eta))
        _coef_bwd_kernel[(NT, H)](q, k, theta, alpha, eta, dR, dL, vpart, gpart, spart, dtheta, dalpha, deta, meta.cu,
                                  meta.chunk_indices, scale, mb, Ttot, NT, H=H, K=K, BT=CHUNK, BK=BKc, NVP=NVc, NVS=NV,
                                  NKS=NKc,
                                  **{n: x for n, x in dots(q.dtype).items() if n != "WT"},
                                      **launch("titans.coef_bwd", num_warps=2, num_stages=2))
        return dq, dk, dv, dtheta, dalpha, deta, dh0, None, None, None, None


def miscompiled_widths(K: int, V: int, device: torch.device) -> bool:
    """Whether the chunk kernels are known to compute wrong outputs at key width ``K`` and value width ``V``
    on ``device``: on an H100 with Triton 3.6 (bfloat16, against the float64 token loop), every pairing with
    K in {64, 128} and V in {16, 32} gave outputs off by 40-60% of their largest value, the others (K, V in
    {16, 32, 64, 128}) were within tolerance. Two warps in the output kernel, the cure of the chunk rules'
    mixed widths (``mixed_block_warps``), left the error unchanged: the miscompiled kernel is another one.
    Checked for Hopper GPUs and Triton before 3.7.1 (the versions fla issue #640 names for its own Hopper
    miscompiles); the chunk path refuses these widths there rather than return wrong numbers."""
    return (K > 32 and V <= 32 and _is_hopper(device) and not is_interpreting()
            and _version(triton.__version__) < (3, 7, 1))


def _version(text: str) -> tuple[int, ...]:
    """'3.6.0' -> (3, 6, 0); '3.8.0+git1234' -> (3, 8, 0)."""
    return tuple(int(n) for n in re.findall(r"\d+", text)[:3])


def chunk_titans(q: Tensor, k: Tensor, v: Tensor, theta: Tensor, alpha: Tensor, eta: Tensor, *, scale: float,
                 mini_batch: int, initial_state: Tensor | None, output_final_state: bool,
                 cu_seqlens: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """q, k ``[B, T, H, K]``; v ``[B, T, H, V]``; theta, alpha, eta ``[B, T, H]``; initial_state
    ``[N, H, 3, K, V]``. Returns ``(o [B, T, H, V], final_state [N, H, 3, K, V] or None)``."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    if miscompiled_widths(K, V, q.device):
        raise ValueError(f"the titans chunk kernels give wrong outputs on this GPU (Hopper) with Triton "
                         f"{triton.__version__} at key width K={K} with value width V={V}: on an H100 with Triton "
                         "3.6 they do wherever K > 32 and V <= 32; use value widths above 32, impl='chunked' "
                         "(the torch chunk path; model.mom.impl=chunked in a config), or Triton >= 3.7.1")
    meta = chunk_meta(B, T, cu_seqlens, CHUNK, q.device)

    def flat(x):
        return x.reshape(B * T, *x.shape[2:]).contiguous()

    o, ht = TitansChunk.apply(flat(q), flat(k), flat(v), flat(theta), flat(alpha), flat(eta),
                              contiguous(initial_state), float(scale), int(mini_batch), bool(output_final_state),
                              meta)
    return o.view(B, T, H, V), ht
