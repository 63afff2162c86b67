"""Triton helpers shared by the titans forward (``chunk.py``) and backward (``backward.py``) kernels."""

from __future__ import annotations

import triton
import triton.language as tl

TINY = tl.constexpr(1e-30)  # |gate factor| floor: products through an exact zero stay below float32 resolution


@triton.jit
def _states(x, p_0, m_kv, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, LOAD: tl.constexpr):
    """The three ``[BK, BV]`` blocks (M, S, M0) of a state ``[3, K, V]`` at ``x + p_0`` in float32, or
    zeros unless LOAD."""
    b_M = tl.zeros([BK, BV], dtype=tl.float32)
    b_S = tl.zeros([BK, BV], dtype=tl.float32)
    b_M0 = tl.zeros([BK, BV], dtype=tl.float32)
    if LOAD:
        b_M += tl.load(x + p_0, mask=m_kv, other=0.0).to(tl.float32)
        b_S += tl.load(x + p_0 + K * V, mask=m_kv, other=0.0).to(tl.float32)
        b_M0 += tl.load(x + p_0 + 2 * K * V, mask=m_kv, other=0.0).to(tl.float32)
    return b_M, b_S, b_M0


@triton.jit
def _read_rows(cpos, MB, BT: tl.constexpr):
    """p[j]: chunk-local index of the memory token j reads (-1: the chunk-start memory, < -1: the
    carried M0 of a mini-batch that began before the chunk)."""
    o_t = tl.arange(0, BT)
    return ((cpos + o_t) // MB) * MB - cpos - 1


@triton.jit
def _cumprod_matrix(x, BT: tl.constexpr):
    """``P[t, s] = prod_{s < r <= t} x_r`` for t >= s, 0 above (no logarithms: exact zeros stay exact)."""
    o = tl.arange(0, BT)
    P = tl.cumprod(tl.where(o[:, None] > o[None, :], x[:, None], 1.0), axis=0)
    return tl.where(o[:, None] >= o[None, :], P, 0.0)


@triton.jit
def _cumprod_matrix_t(x, BT: tl.constexpr):
    """The transpose of ``_cumprod_matrix``: ``[s, t]``."""
    o = tl.arange(0, BT)
    P = tl.cumprod(tl.where(o[None, :] > o[:, None], x[None, :], 1.0), axis=1)
    return tl.where(o[None, :] >= o[:, None], P, 0.0)


@triton.jit
def _load_gates(theta, alpha, eta, tok, i_h, m_t, H: tl.constexpr):
    """theta, a = 1 - alpha and eta of a chunk (padding neutral: 0, 1, 1), factors floored at TINY."""
    b_theta = tl.load(theta + tok * H + i_h, mask=m_t, other=0.0).to(tl.float32)
    b_a = 1.0 - tl.load(alpha + tok * H + i_h, mask=m_t, other=0.0).to(tl.float32)
    b_eta = tl.load(eta + tok * H + i_h, mask=m_t, other=1.0).to(tl.float32)
    b_a = tl.where(tl.abs(b_a) < TINY, TINY, b_a)
    b_eta = tl.where(tl.abs(b_eta) < TINY, TINY, b_eta)
    return b_theta, b_a, b_eta


@triton.jit
def _chunk_ahead(scal, Dth, Lc, wS, coef, i_c, bos, i_t, Lseg, i_h, H: tl.constexpr, BT: tl.constexpr,
                 COEF: tl.constexpr):
    """What the state passes read of chunk ``i_t`` (global chunk ``i_c``) besides its tiles: the 8
    per-chunk scalars ``scal``; the rows of ``Dth`` and ``Lc`` at its last real token and ``wS``;
    ``Aa`` and ``c`` (COEF, else zeros); zeros outside the segment. Loaded one chunk ahead: they feed no ``tl.dot``, so
    Triton's pipeliner would leave each load's latency in the sequential loop."""
    o_t = tl.arange(0, BT)
    o_8 = tl.arange(0, 8)
    L = Lseg - i_t * BT
    ok = (i_t + 0 * o_t >= 0) & (o_t < L)
    e = tl.minimum(L, BT) - 1
    tok = bos + i_t * BT + o_t
    b_s = tl.load(scal + (i_c * H + i_h) * 8 + o_8, mask=(i_t + 0 * o_8 >= 0) & (i_t * BT + 0 * o_8 < Lseg),
                  other=0.0)
    p_e = ((bos + i_t * BT + e) * H + i_h) * BT + o_t
    b_wM = tl.load(Dth + p_e, mask=ok, other=0.0)
    b_w0 = tl.load(Lc + p_e, mask=ok, other=0.0)
    b_wS = tl.load(wS + tok * H + i_h, mask=ok, other=0.0)
    if COEF:
        b_Aa = tl.load(coef + (tok * H + i_h) * 4, mask=ok, other=0.0)
        b_c = tl.load(coef + (tok * H + i_h) * 4 + 1, mask=ok, other=0.0)
    else:
        b_Aa = tl.zeros([BT], dtype=tl.float32)
        b_c = tl.zeros([BT], dtype=tl.float32)
    return b_s, b_wM, b_w0, b_wS, b_Aa, b_c


@triton.jit
def _pick(x, o_t, e):
    return tl.sum(tl.where(o_t == e, x, 0.0), axis=0)
