"""Gated linear attention (Yang et al. 2023): ``S_t = Diag(exp g_t) S_{t-1} + k_t v_t^T``.

``g`` is a per-channel log decay ``[B, T, H, K]`` (<= 0), from a low-rank ``logsigmoid / 16`` gate.
"""

from __future__ import annotations

from momkit.rules import register_rule
from momkit.rules._families import gated_linear_chunk
from momkit.rules.base import GateSpec, Rule, outer, read
from momkit.rules.gates import GLAGate


class GLA(Rule):
    name = "gla"
    gates = (GateSpec("g", per_channel=True, neutral=0.0, domain="log_decay",
                      doc="per-channel log decay, <= 0"),)
    doc = "S_t = Diag(exp g_t) S_{t-1} + k_t v_t^T"

    def gate_module(self, hidden_size, num_heads, head_k_dim):
        return GLAGate(hidden_size, num_heads, head_k_dim)

    def _step(self, q, k, v, S, gates, scale, position, opts):
        S = gates["g"].exp()[..., None] * S + outer(k, v)
        return read(q, S, scale), S

    def _chunk(self, q, k, v, gates, scale, S0, plan, opts):
        return gated_linear_chunk(q, k, v, gates["g"], scale, S0, plan)


register_rule(GLA())
