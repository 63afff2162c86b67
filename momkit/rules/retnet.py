"""Retention (RetNet, Sun et al. 2023): ``S_t = exp(g_t) S_{t-1} + k_t v_t^T``.

The math takes any per-head log decay ``g`` ``[B, T, H]``; RetNet's gate module supplies the fixed,
non-learned decays ``log(1 - 2^(-5 - h))`` of head h.
"""

from __future__ import annotations

from momkit.rules import register_rule
from momkit.rules._families import gated_linear_chunk
from momkit.rules.base import GateSpec, Rule, outer, read
from momkit.rules.gates import FixedDecay


class RetNet(Rule):
    name = "retnet"
    gates = (GateSpec("g", per_channel=False, neutral=0.0, domain="log_decay", doc="per-head log decay, <= 0"),)
    doc = "S_t = exp(g_t) S_{t-1} + k_t v_t^T (fixed per-head decay)"

    def gate_module(self, hidden_size, num_heads, head_k_dim):
        return FixedDecay(num_heads)

    def _step(self, q, k, v, S, gates, scale, position, opts):
        S = gates["g"].exp()[..., None, None] * S + outer(k, v)
        return read(q, S, scale), S

    def _chunk(self, q, k, v, gates, scale, S0, plan, opts):
        return gated_linear_chunk(q, k, v, gates["g"], scale, S0, plan)


register_rule(RetNet())
