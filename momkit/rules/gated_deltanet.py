"""Gated DeltaNet (Yang et al. 2025): ``S' = exp(g_t) S_{t-1}; S_t = S' + beta_t k_t (v_t - S'^T k_t)^T``.

``g`` ``[B, T, H]`` (<= 0) is Mamba2's decay ``-exp(A_log) * softplus(a(x) + dt_bias)``;
``beta = sigmoid(b(x))``; q and k are L2-normalised by layers. Chunked via the WY / UT form.
"""

from __future__ import annotations

from momkit.rules import register_rule
from momkit.rules._families import delta_chunk
from momkit.rules.base import GateSpec, Rule, outer, read
from momkit.rules.gates import GatedDeltaGates


class GatedDeltaNet(Rule):
    name = "gated_deltanet"
    gates = (
        GateSpec("g", per_channel=False, neutral=0.0, domain="log_decay", doc="per-head log decay, <= 0"),
        GateSpec("beta", per_channel=False, neutral=0.0, domain="unit", doc="write strength in [0, 1]"),
    )
    normalize_qk = True
    doc = "S' = exp(g_t) S_{t-1}; S_t = S' + beta_t k_t (v_t - S'^T k_t)^T"

    def gate_module(self, hidden_size, num_heads, head_k_dim):
        return GatedDeltaGates(hidden_size, num_heads)

    def _step(self, q, k, v, S, gates, scale, position, opts):
        S = gates["g"].exp()[..., None, None] * S
        pred = (k[..., None, :] @ S)[..., 0, :]
        S = S + gates["beta"][..., None, None] * outer(k, v - pred)
        return read(q, S, scale), S

    def _chunk(self, q, k, v, gates, scale, S0, plan, opts):
        return delta_chunk(q, k, v, gates["beta"], gates["g"], scale, S0, plan)


register_rule(GatedDeltaNet())
