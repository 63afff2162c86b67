"""Chunk-parallel cores shared by rule families (pure PyTorch, differentiable by autograd).

All inputs are chunk rows (see ``_chunking``): q, k ``[R, H, C, K]``, v ``[R, H, C, V]``, per-head
gates ``[R, H, C]``, per-channel gates ``[R, H, C, K]``. Derivations: ``docs/rules.md``.

* gated linear family (linear_attn, retnet, mamba2, gla): ``S_t = Diag(a_t) S_{t-1} + k_t v_t^T``
  with no gate, a per-head or a per-channel log decay ``g = log a``.
* delta family (deltanet, gated_deltanet): the WY / UT form,
  ``U = (I + L)^{-1} diag(beta) (V - diag(gamma) K S_0)``.
"""

from __future__ import annotations

import torch

from momkit.rules._chunking import ChunkPlan, decay_exp, decay_exp_, decay_matrix, scan_chunks

Tensor = torch.Tensor

# Per-channel log decays are floored here in the chunked path (see _per_channel_intra).
_LOG_DECAY_FLOOR = -40.0
# Fast path of _per_channel_intra: when no sub-chunk decays by more than this (log) amount in some
# channel, exp(G) and exp(-G) inside a sub-chunk are finite and normal in the input's precision.
_SUBCHUNK_DECAY_LIMIT = {torch.float32: 50.0, torch.float64: 500.0}


def gated_linear_chunk(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, scale: float,
                       S0: Tensor, plan: ChunkPlan) -> tuple[Tensor, Tensor]:
    """``S_t = Diag(exp g_t) S_{t-1} + k_t v_t^T``; g is None, ``[R, H, C]`` or ``[R, H, C, K]``."""
    if g is None:
        o_intra = (q @ k.mT).tril_() @ v
        qg, kg, dec = q, k, None
    elif g.dim() == 3:
        G = g.cumsum(-1)  # log decay from the chunk start to i, inclusive
        o_intra = (q @ k.mT * decay_matrix(G)) @ v
        qg = q * decay_exp(G)[..., None]
        kg = k * decay_exp(G[..., -1:] - G)[..., None]
        dec = decay_exp(G[..., -1])[..., None, None]  # [R, H, 1, 1]
    else:
        o_intra, qg, kg, dec = _per_channel_intra(q, k, v, g)
    kv = kg.mT @ v  # [R, H, K, V]: what each chunk adds to the decayed state

    def step(rows: slice, S: Tensor) -> tuple[Tensor, Tensor]:
        return S, (S if dec is None else dec[rows] * S) + kv[rows]

    S_start, final = scan_chunks(plan, S0, step)  # the loop is elementwise; outputs in one batch
    return scale * (o_intra + qg @ S_start), final


def _subchunk(C: int) -> int:
    return next(c for c in (32, 16, 8, 4, 2, 1) if C % c == 0)  # 32 measured fastest on CPU (C = 64)


def _per_channel_intra(q: Tensor, k: Tensor, v: Tensor, g: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Intra-chunk output ``sum_{j <= i} (sum_d q_id k_jd exp(G_id - G_jd)) v_j`` for per-channel decay.

    The chunk is split into sub-chunks of c tokens. Between sub-chunks b < a the decay factorises
    through the sub-chunk boundaries with every factor <= 1 (no overflow); inside a sub-chunk it is
    factorised around the sub-chunk's start in the input's precision, or, under decays too strong for
    that, around its middle token in float64. Also returns the inter-chunk factors
    ``q exp(G)``, ``k exp(G_C - G)`` and ``exp(G_C)``.
    """
    R, H, C, K = q.shape
    V = v.shape[-1]
    c = _subchunk(C)
    n = C // c
    # exp(-40) ~ 4e-18 is below float64 resolution: the floor changes no result, and bounds the
    # factorised exponents of the strong-decay path by (c / 2) * 40 <= 640 (finite in float64).
    g = g.clamp(min=_LOG_DECAY_FLOOR)
    Gs = g.view(R, H, n, c, K).cumsum(-2)  # within each sub-chunk, inclusive
    step_dec = Gs[..., -1, :]  # [R, H, n, K]: log decay across each sub-chunk
    G_ref = step_dec.cumsum(2) - step_dec  # [R, H, n, K]: from the chunk start to each sub-chunk's start
    q5, k5 = q.view(R, H, n, c, K), k.view(R, H, n, c, K)
    vs = v.view(R, H, n, c, V)
    if float(-step_dec.detach().amin()) <= _SUBCHUNK_DECAY_LIMIT.get(q.dtype, -1.0):
        # fast path: 0 >= G >= -limit inside a sub-chunk, so q exp(G) and k exp(-G) factor exp(G_i - G_j)
        # with finite, normal factors (products for j > i may be large but finite, and are masked)
        qs = q5 * Gs.exp()  # decay from the sub-chunk start to i
        k_inv = k5 * (-Gs).exp()
        A_diag = (qs @ k_inv.mT).tril_()  # [R, H, n, c, c]
        ks = k_inv * step_dec.exp()[..., None, :]  # decay from j to the sub-chunk end
    else:
        # strong decay: factorise around the sub-chunk's middle token m in float64, where the factors
        # exp(+-(G - G_m)) reach at most exp((c / 2) * 40) = exp(640)
        qs = q5 * decay_exp(Gs)
        ks = k5 * decay_exp_(step_dec[..., None, :] - Gs)
        Gd = (Gs - Gs[..., c // 2 : c // 2 + 1, :]).to(torch.float64)
        qd = q5.to(torch.float64) * Gd.exp()
        kd = k5.to(torch.float64) * (-Gd).exp()
        A_diag = (qd @ kd.mT).tril_().to(q.dtype)

    # sub-chunk a reads sub-chunks b < a through exp(G_ref[a] - G_ref[b] - step_dec[b]) <= 1
    G_end = G_ref + step_dec
    outs = [A_diag[:, :, 0] @ vs[:, :, 0]]
    for a in range(1, n):
        between = decay_exp(G_ref[:, :, a, None] - G_end[:, :, :a])  # [R, H, a, K]
        A_off = (qs[:, :, a, None] * between[..., None, :]) @ ks[:, :, :a].mT  # [R, H, a, c, c]
        outs.append(A_diag[:, :, a] @ vs[:, :, a] + (A_off @ vs[:, :, :a]).sum(2))
    o_intra = torch.stack(outs, 2).view(R, H, C, V)

    G_last = G_end[:, :, -1]  # [R, H, K]
    qg = (qs * decay_exp(G_ref)[..., None, :]).view(R, H, C, K)  # q exp(G), both factors <= 1
    kg = (ks * decay_exp(G_last[:, :, None] - G_end)[..., None, :]).view(R, H, C, K)
    dec = decay_exp(G_last)[..., None]  # [R, H, K, 1]
    return o_intra, qg, kg, dec


def delta_chunk(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None, scale: float,
                S0: Tensor, plan: ChunkPlan) -> tuple[Tensor, Tensor]:
    """``S' = exp(g_t) S_{t-1}; S_t = S' + beta_t k_t (v_t - S'^T k_t)^T`` (g None: deltanet)."""
    if g is None:
        L = (k @ k.mT * beta[..., :, None]).tril_(-1)
        A = (q @ k.mT).tril_()
        qg, kgam, kd, dec = q, k, k, None
    else:
        G = g.cumsum(-1)
        D = decay_matrix(G)  # one decay matrix: L takes its strict lower part
        L = (k @ k.mT * beta[..., :, None] * D).tril_(-1)
        A = q @ k.mT * D
        gam = decay_exp(G)[..., None]
        qg, kgam = q * gam, k * gam
        kd = k * decay_exp(G[..., -1:] - G)[..., None]
        dec = decay_exp(G[..., -1])[..., None, None]
    # L_ij = beta_i (k_i . k_j) gamma_i / gamma_j (j < i); U = u0 - W S_0 are the chunk's pseudo-values
    Tb = unit_lower_inverse(L) * beta[..., None, :]  # (I + L)^{-1} diag(beta)
    u0, W = flat_heads(Tb @ v), flat_heads(Tb @ kgam)
    kdT = flat_heads(kd).mT  # a transposed view: bmm reads it without a copy
    H = q.shape[1]

    # the loop carries the state and the pseudo-values U; the outputs q S + A U come in one batch after
    def step(rows: slice, S: Tensor) -> tuple[tuple[Tensor, Tensor], Tensor]:
        r, S3 = slice(rows.start * H, rows.stop * H), S.flatten(0, 1)
        U = torch.baddbmm(u0[r], W[r], S3, alpha=-1)
        S_next = torch.baddbmm(S3 if dec is None else (dec[rows] * S).flatten(0, 1), kdT[r], U)
        return (S, U.view(-1, H, *U.shape[1:])), S_next.view(S.shape)

    (S_start, U), final = scan_chunks(plan, S0, step)
    o = torch.baddbmm(flat_heads(qg) @ S_start.flatten(0, 1), A.flatten(0, 1), U.flatten(0, 1),
                      beta=scale, alpha=scale)  # scale * (q S + A U)
    return o.view(*A.shape[:-1], o.shape[-1]), final


def flat_heads(x: Tensor) -> Tensor:
    """``[R, H, ...] -> [R * H, ...]`` (contiguous), for 3-D batched matmuls in the state loop."""
    return x.flatten(0, 1).contiguous()


def unit_lower_inverse(L: Tensor) -> Tensor:
    """``(I + L)^{-1}`` for strictly lower-triangular ``L`` ``[..., C, C]``.

    One triangular solve against the identity, then a matmul by the caller: faster on CPU than
    solving against a wide right-hand side.
    """
    eye = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device).expand_as(L)
    return torch.linalg.solve_triangular(L, eye, upper=False, unitriangular=True)
