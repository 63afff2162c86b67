"""Fused recurrent kernel of the delta family (decoding: one token, or a few, per call).

``S' = exp(g_t) S_{t-1};  S_t = S' + beta_t k_t (v_t - S'^T k_t)^T``, ``o_t = scale S_t^T q_t`` token by
token with the state in registers (all of K, a block of V per program: the delta update needs all of
K for ``S'^T k``, and V columns are independent). Forward only.
q, k ``[B, T, H, K]``, v ``[B, T, H, V]``, beta, g ``[B, T, H]``, state ``[B, H, K, V]`` float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import pow2

Tensor = torch.Tensor


@triton.jit
def _fused_recurrent_kernel(q, k, v, beta, g, s0, o, s1, slot, keep, scale, T,
                            H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                            BV: tl.constexpr, GATED: tl.constexpr, INDEXED: tl.constexpr):
    i_bh, i_v = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    # INDEXED: this row's state is row slot[i_b] of s0, updated there in place where keep[i_b] (s1 is s0)
    if INDEXED:
        i_s = tl.load(slot + i_b).to(tl.int64)
    else:
        i_s = i_b.to(tl.int64)
    p_s = (i_s * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :]
    b_h = tl.load(s0 + p_s, mask=m_kv, other=0.0).to(tl.float32)
    for t in range(0, T):
        tok = i_b.to(tl.int64) * T + t
        b_q = tl.load(q + (tok * H + i_h) * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_k = tl.load(k + (tok * H + i_h) * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_v = tl.load(v + (tok * H + i_h) * V + o_v, mask=m_v, other=0.0).to(tl.float32)
        b_beta = tl.load(beta + tok * H + i_h).to(tl.float32)
        if GATED:
            b_h *= tl.exp(tl.load(g + tok * H + i_h).to(tl.float32))
        b_pred = tl.sum(b_h * b_k[:, None], axis=0)
        b_h += (b_beta * b_k)[:, None] * (b_v - b_pred)[None, :]
        b_o = tl.sum(b_h * b_q[:, None], axis=0) * scale
        tl.store(o + (tok * H + i_h) * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)
    if INDEXED:
        m_kv = m_kv & (tl.load(keep + i_b + 0 * o_v) != 0)[None, :]  # keep[i_b], one per column
    tl.store(s1 + p_s, b_h, mask=m_kv)


def fused_recurrent_delta(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None, state: Tensor, *,
                          scale: float, slots: Tensor | None = None,
                          keep: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Returns ``(o [B, T, H, V], new state [B, H, K, V] float32)``; ``state`` is not modified. With ``slots``
    ``[B]`` (distinct) and ``keep`` ``[B]``: row b's state is ``state[slots[b]]`` (``state`` ``[N, H, K, V]``
    float32, contiguous), overwritten in place where ``keep[b]``; returns ``(o, state)``."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    BK = pow2(K, 1)
    BV = min(pow2(V, 1), max(8, 8192 // BK))
    o = v.new_empty(B, T, H, V)
    indexed = slots is not None
    s1 = state if indexed else state.new_empty(B, H, K, V, dtype=torch.float32)
    args = [x.contiguous() if x is not None else None for x in (q, k, v, beta, g)]
    _fused_recurrent_kernel[(B * H, triton.cdiv(V, BV))](*args, state if indexed else state.contiguous(), o, s1,
                                                         slots, keep, float(scale), T, H=H, K=K, V=V, BK=BK, BV=BV,
                                                         GATED=g is not None, INDEXED=indexed)
    return o, s1
