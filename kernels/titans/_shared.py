"""Triton helpers shared by the titans forward (``chunk.py``) and backward (``backward.py``) kernels."""

from __future__ import annotations

import triton
import triton.language as tl

TINY = tl.constexpr(1e-30)  # |gate factor| floor: products through an exact zero stay below float32 resolution


@triton.jit
def _chunk_pos(chunk_indices, cu, i_t, BT: tl.constexpr):
    """(first token, tokens left in the segment from it, position of the chunk in its segment)."""
    i_n = tl.load(chunk_indices + i_t * 2).to(tl.int64)
    i_c = tl.load(chunk_indices + i_t * 2 + 1).to(tl.int64)
    bos = tl.load(cu + i_n)
    eos = tl.load(cu + i_n + 1)
    return bos + i_c * BT, eos - bos - i_c * BT, i_c * BT


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
def _pick(x, o_t, e):
    return tl.sum(tl.where(o_t == e, x, 0.0), axis=0)
