"""Linear attention (Katharopoulos et al. 2020): ``S_t = S_{t-1} + k_t v_t^T``. No gates."""

from __future__ import annotations

from momkit.rules import register_rule
from momkit.rules._families import gated_linear_chunk
from momkit.rules.base import Rule, outer, read
from momkit.rules.gates import NoGates


class LinearAttention(Rule):
    name = "linear_attn"
    doc = "S_t = S_{t-1} + k_t v_t^T"

    def gate_module(self, hidden_size, num_heads, head_k_dim):
        return NoGates()

    def _step(self, q, k, v, S, gates, scale, position, opts):
        S = S + outer(k, v)
        return read(q, S, scale), S

    def _chunk(self, q, k, v, gates, scale, S0, plan, opts):
        return gated_linear_chunk(q, k, v, None, scale, S0, plan)


register_rule(LinearAttention())
