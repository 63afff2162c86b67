"""Titans' linear memory (Behrouz et al. 2024): mini-batch gradient descent with momentum and forgetting.

Tokens are grouped in mini-batches of ``mini_batch`` tokens counted from the start of each sequence
or segment (each call starts counting at 0); ``M0`` is the memory just before the mini-batch's first
token. For each token::

    u_t = k_t (M0^T k_t - v_t)^T          gradient of 1/2 ||M^T k_t - v_t||^2 at M0
    S_t = eta_t S_{t-1} - theta_t u_t      momentum
    M_t = (1 - alpha_t) M_{t-1} + S_t      memory, with forgetting
    o_t = scale * M_t^T q_t

State layout ``[N, H, 3, K, V]``: slot 0 the memory ``M``, slot 1 the momentum ``S``, slot 2 ``M0``, the
memory the last token's gradient was taken at (just before its mini-batch), so that decoding can resume
in the middle of a mini-batch (``step`` needs the token's ``position``; at a mini-batch start it
replaces ``M0`` by ``M``). ``mini_batch = 1`` is exact token-level gradient
descent; with ``eta = alpha = 0`` it equals deltanet with ``beta = theta``.

The chunked form (docs/rules.md) solves one unit-lower-triangular system per chunk, like the delta
rule's UT form, but with the triangle cut at mini-batch boundaries; chunks hold whole mini-batches.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from momkit.rules import register_rule
from momkit.rules._chunking import causal_mask, flush_tiny, scan_chunks
from momkit.rules._families import flat_heads, unit_lower_inverse
from momkit.rules.base import GateSpec, Rule, outer, read
from momkit.rules.gates import SigmoidGates

Tensor = torch.Tensor


def decay_products(x: Tensor) -> Tensor:
    """``P[t, s] = prod_{s < r <= t} x_r`` for ``t >= s``, 0 above the diagonal. ``x``: ``[..., C]``.

    Built with a cumulative product (no logarithms), so factors equal to 0 are exact.
    """
    C = x.shape[-1]
    X = x[..., :, None].expand(*x.shape, C)  # X[t, s] = x_t
    X = torch.where(causal_mask(C, x.device, strict=True), X, torch.ones_like(X))
    return flush_tiny(X.cumprod(-2)).masked_fill(~causal_mask(C, x.device), 0.0)


class Titans(Rule):
    name = "titans"
    gates = (
        GateSpec("theta", per_channel=False, neutral=0.0, domain="unit", doc="inner learning rate"),
        GateSpec("alpha", per_channel=False, neutral=0.0, domain="unit", doc="forgetting, in [0, 1]"),
        GateSpec("eta", per_channel=False, neutral=1.0, domain="unit", doc="momentum decay, in [0, 1]"),
    )
    options: ClassVar[dict[str, Any]] = {"mini_batch": 16}
    option_variants = ({}, {"mini_batch": 1}, {"mini_batch": 4})
    normalize_qk = True
    state_slots = 3
    doc = "mini-batch gradient descent with momentum (eta) and forgetting (alpha), step theta"

    def gate_module(self, hidden_size, num_heads, head_k_dim):
        # theta ~ 0.1, eta ~ 0.9 (an effective step theta / (1 - eta) ~ 1), alpha ~ 0.01
        return SigmoidGates(hidden_size, num_heads, {"theta": -2.2, "alpha": -4.6, "eta": 2.2})

    def _check_options(self, opts):
        mb = opts["mini_batch"]
        if not isinstance(mb, int) or isinstance(mb, bool) or mb < 1:
            raise ValueError(f"{self.name} option mini_batch must be a positive int, got {mb!r}")

    def _chunk_len(self, chunk_size, opts):
        # chunks hold whole mini-batches: the largest multiple of mini_batch <= chunk_size (at least one)
        mb = opts["mini_batch"]
        return max(mb, chunk_size - chunk_size % mb)

    def _step(self, q, k, v, state, gates, scale, position, opts):
        M, S, M0 = state.unbind(2)
        mb = opts["mini_batch"]
        if mb > 1 and position is None:
            raise ValueError(f"{self.name}.step with mini_batch > 1 needs position (the token's index in its sequence)")
        if mb == 1:
            M0 = M
        else:
            starts = torch.as_tensor(position, device=M.device) % mb == 0
            M0 = torch.where(starts.reshape(-1, *[1] * (M.dim() - 1)), M, M0)
        pred = (k[..., None, :] @ M0)[..., 0, :]
        S = gates["eta"][..., None, None] * S - gates["theta"][..., None, None] * outer(k, pred - v)
        M = (1 - gates["alpha"])[..., None, None] * M + S
        return read(q, M, scale), torch.stack([M, S, M0], 2)

    def _chunk(self, q, k, v, gates, scale, S0, plan, opts):
        mb = opts["mini_batch"]
        R, _, C, K = q.shape
        theta = gates["theta"]
        Pa = decay_products(1 - gates["alpha"])  # [R, H, C, C]
        Pe = decay_products(gates["eta"])
        Ee = flush_tiny(gates["eta"].cumprod(-1))  # [R, H, C]
        Aa = Pa[..., 0] * (1 - gates["alpha"][..., :1])  # prod_{r <= t} (1 - alpha_r)
        c = (Pa @ Ee[..., None])[..., 0]  # weight of the initial momentum in M_t
        D = Pa @ Pe  # weight of -theta_j u_j in M_t
        # Row r of the memory formula, for r in -1 .. C-1 (row -1 = the chunk's initial memory).
        ones = torch.ones_like(Aa[..., :1])
        Aa_aug, c_aug = torch.cat([ones, Aa], -1), torch.cat([0 * ones, c], -1)
        D_aug = torch.cat([torch.zeros_like(D[..., :1, :]), D], -2) * theta[..., None, :]
        # token j reads the memory at p(j), the last token before its mini-batch
        p1 = (torch.arange(C, device=q.device) // mb) * mb  # p(j) + 1
        L = D_aug[..., p1, :] * (k @ k.mT)  # strictly lower (cut at mini-batch starts)
        T = unit_lower_inverse(L)
        # r_j = M0(j)^T k_j - v_j = (W [M; S] - U0)_j
        W = T @ torch.cat([Aa_aug[..., p1, None] * k, c_aug[..., p1, None] * k], -1)  # [R, H, C, 2K]
        U0 = T @ v

        # After the last real token e of each row: M_e, S_e and M0 = the memory at f = p(e), each
        # (a M + c S - kw^T r) with the row's coefficients a, c [R, H, 3] and weights kw [R, H, 3K, C].
        e = plan.valid - 1  # [R]
        f = (e // mb) * mb - 1
        Ee_aug = torch.cat([ones, Ee], -1)
        Pe_aug = torch.cat([torch.zeros_like(Pe[..., :1, :]), Pe], -2) * theta[..., None, :]
        pick = torch.arange(R, device=q.device)
        a = torch.stack([Aa_aug[pick, :, e + 1], 0 * ones[..., 0], Aa_aug[pick, :, f + 1]], 2)[..., None, None]
        cc = torch.stack([c_aug[pick, :, e + 1], Ee_aug[pick, :, e + 1], c_aug[pick, :, f + 1]], 2)[..., None, None]
        w = torch.stack([D_aug[pick, :, e + 1], Pe_aug[pick, :, e + 1], D_aug[pick, :, f + 1]], 2)  # [R, H, 3, C]
        kwT = (k.mT[:, :, None] * w[..., None, :]).flatten(2, 3)
        Aq = (q @ k.mT) * D * theta[..., None, :]
        qac = torch.cat([q * Aa[..., None], q * c[..., None]], -1)  # [R, H, C, 2K]

        W, U0, kwT, Aq, qac = (flat_heads(x) for x in (W, U0, kwT, Aq, qac))

        def step(rows: slice, state: Tensor) -> tuple[Tensor, Tensor]:
            n, h = state.shape[:2]
            x = slice(rows.start * h, rows.stop * h)
            MS = state[:, :, :2].flatten(2, 3).flatten(0, 1)  # [n H, 2K, V], a view
            r = torch.baddbmm(U0[x], W[x], MS, beta=-1)
            o = torch.baddbmm(qac[x] @ MS, Aq[x], r, alpha=-1).view(n, h, C, -1)
            nxt = a[rows] * state[:, :, :1] + cc[rows] * state[:, :, 1:2]
            return o, nxt - (kwT[x] @ r).view(n, h, 3, K, -1)

        o, final = scan_chunks(plan, S0, step)
        return scale * o, final


register_rule(Titans())
