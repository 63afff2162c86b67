"""Fused recurrent kernel of titans (decoding: one token, or a few, per call).

Token by token with ``M``, ``S``, ``M0`` in registers (all of K, a block of V per program)::

    M0 = M if the token starts a mini-batch (position % mini_batch == 0)
    S <- eta S - theta k (M0^T k - v)^T;   M <- (1 - alpha) M + S;   o = scale M^T q

``position`` ``[B]`` int64 is the index of the first token of this call in its sequence.
q, k ``[B, T, H, K]``, v ``[B, T, H, V]``, theta, alpha, eta ``[B, T, H]``, state ``[B, H, 3, K, V]`` float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import pow2

Tensor = torch.Tensor


@triton.jit
def _fused_recurrent_kernel(q, k, v, theta, alpha, eta, position, s0, o, s1, scale, T, MB,
                            H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                            BV: tl.constexpr):
    i_bh, i_v = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_s = i_bh.to(tl.int64) * 3 * K * V + o_k[:, None] * V + o_v[None, :]
    b_M = tl.load(s0 + p_s, mask=m_kv, other=0.0).to(tl.float32)
    b_S = tl.load(s0 + p_s + K * V, mask=m_kv, other=0.0).to(tl.float32)
    b_M0 = tl.load(s0 + p_s + 2 * K * V, mask=m_kv, other=0.0).to(tl.float32)
    pos = tl.load(position + i_b)
    for t in range(0, T):
        tok = i_b.to(tl.int64) * T + t
        b_q = tl.load(q + (tok * H + i_h) * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_k = tl.load(k + (tok * H + i_h) * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_v = tl.load(v + (tok * H + i_h) * V + o_v, mask=m_v, other=0.0).to(tl.float32)
        b_theta = tl.load(theta + tok * H + i_h).to(tl.float32)
        b_a = 1.0 - tl.load(alpha + tok * H + i_h).to(tl.float32)
        b_eta = tl.load(eta + tok * H + i_h).to(tl.float32)
        b_M0 = tl.where((pos + t) % MB == 0, b_M, b_M0)
        b_r = tl.sum(b_M0 * b_k[:, None], axis=0) - b_v
        b_S = b_eta * b_S - (b_theta * b_k)[:, None] * b_r[None, :]
        b_M = b_a * b_M + b_S
        b_o = tl.sum(b_M * b_q[:, None], axis=0) * scale
        tl.store(o + (tok * H + i_h) * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)
    tl.store(s1 + p_s, b_M, mask=m_kv)
    tl.store(s1 + p_s + K * V, b_S, mask=m_kv)
    tl.store(s1 + p_s + 2 * K * V, b_M0, mask=m_kv)


def fused_recurrent_titans(q: Tensor, k: Tensor, v: Tensor, theta: Tensor, alpha: Tensor, eta: Tensor,
                           state: Tensor, position: Tensor, *, scale: float,
                           mini_batch: int) -> tuple[Tensor, Tensor]:
    """Returns ``(o [B, T, H, V], new state [B, H, 3, K, V] float32)``; ``state`` is not modified."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    BK = pow2(K, 1)
    BV = min(pow2(V, 1), max(8, 4096 // BK))
    o = v.new_empty(B, T, H, V)
    s1 = state.new_empty(B, H, 3, K, V, dtype=torch.float32)
    args = [x.contiguous() for x in (q, k, v, theta, alpha, eta, position, state)]
    _fused_recurrent_kernel[(B * H, triton.cdiv(V, BV))](*args, o, s1, float(scale), T, int(mini_batch), H=H, K=K,
                                                         V=V, BK=BK, BV=BV)
    return o, s1
