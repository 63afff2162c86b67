"""DeltaNet (Schlag et al. 2021; Yang et al. 2024): ``S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T``.

One step of online gradient descent on ``1/2 ||S^T k_t - v_t||^2`` with step ``beta_t = sigmoid(b(x))``;
q and k are L2-normalised by layers (``prepare_qk``). Chunked via the WY / UT form.
"""

from __future__ import annotations

from momkit.rules import register_rule
from momkit.rules._families import delta_chunk
from momkit.rules.base import GateSpec, Rule, outer, read
from momkit.rules.gates import SigmoidGates


class DeltaNet(Rule):
    name = "deltanet"
    gates = (GateSpec("beta", per_channel=False, neutral=0.0, domain="unit", doc="write strength in [0, 1]"),)
    normalize_qk = True
    doc = "S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T"

    def gate_module(self, hidden_size, num_heads, head_k_dim):
        return SigmoidGates(hidden_size, num_heads, {"beta": 0.0})

    def _step(self, q, k, v, S, gates, scale, position, opts):
        pred = (k[..., None, :] @ S)[..., 0, :]  # S^T k
        S = S + gates["beta"][..., None, None] * outer(k, v - pred)
        return read(q, S, scale), S

    def _chunk(self, q, k, v, gates, scale, S0, plan, opts):
        return delta_chunk(q, k, v, gates["beta"], None, scale, S0, plan)


register_rule(DeltaNet())
