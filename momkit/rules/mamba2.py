"""Mamba2 (Dao & Gu 2024) as a matrix-memory rule: ``S_t = exp(g_t) S_{t-1} + dt_t k_t v_t^T``.

``g`` ``[B, T, H]`` (<= 0) and ``dt`` ``[B, T, H]`` (>= 0) come from ``g = -exp(A_log) * dt``,
``dt = softplus(a(x) + dt_bias)``. Here k plays Mamba2's B, q its C and v its x.
"""

from __future__ import annotations

from momkit.rules import register_rule
from momkit.rules._families import gated_linear_chunk
from momkit.rules.base import GateSpec, Rule, outer, read
from momkit.rules.gates import Mamba2Gates


class Mamba2(Rule):
    name = "mamba2"
    gates = (
        GateSpec("g", per_channel=False, neutral=0.0, domain="log_decay", doc="per-head log decay, <= 0"),
        GateSpec("dt", per_channel=False, neutral=0.0, domain="nonnegative", doc="step size, >= 0"),
    )
    doc = "S_t = exp(g_t) S_{t-1} + dt_t k_t v_t^T"

    def gate_module(self, hidden_size, num_heads, head_k_dim):
        return Mamba2Gates(hidden_size, num_heads)

    def _step(self, q, k, v, S, gates, scale, position, opts):
        S = gates["g"].exp()[..., None, None] * S + gates["dt"][..., None, None] * outer(k, v)
        return read(q, S, scale), S

    def _chunk(self, q, k, v, gates, scale, S0, plan, opts):
        return gated_linear_chunk(q, k * gates["dt"][..., None], v, gates["g"], scale, S0, plan)


register_rule(Mamba2())
