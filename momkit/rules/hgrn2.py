"""HGRN2 (Qin et al. 2024, "HGRN2: Gated Linear RNNs with State Expansion"):
``S_t = Diag(f_t) S_{t-1} + (1 - f_t) v_t^T``, ``o_t = scale * S_t^T q_t``.

GLA's recurrence (``momkit.rules.gla``) with the key tied to the forget gate: ``f_t = exp(g_t)`` in (0, 1)
per channel, from the per-channel log forget gate ``g`` ``[B, T, H, K]`` (<= 0), and the key is
``1 - f_t = -expm1(g_t)``. The rule ignores the k it is given (``uses_key = False``): inside a MoM layer
the memories' k projections (and their short convolutions) are computed and go unused, and their
parameters get no gradient. q is taken as is (HGRN2 passes it through SiLU; the layers' short
convolution on q ends in SiLU).

Gate module (``HGRN2Gate``): HGRN2's ``f = lower_bound + (1 - lower_bound) * sigmoid(W x)`` with a
full-rank ``W`` and no bias, returned as ``g = log f``. In HGRN2 the lower bound is learned per layer and
rises with depth (a softmax over the layers' parameters, cumulated), and the first layer's is 0; a gate
module does not know its layer, so the rule's gate module takes the first layer's, ``lower_bound = 0``
(``g = logsigmoid(W x)``); ``HGRN2Gate(..., lower_bound=b)`` fixes any other.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from momkit.rules import register_rule
from momkit.rules._families import gated_linear_chunk
from momkit.rules.base import GateSpec, Rule, outer, read, upcast
from momkit.rules.gates import _stacked_linear

Tensor = torch.Tensor


def hgrn2_key(g: Tensor) -> Tensor:
    """HGRN2's key ``1 - exp(g)`` from the log forget gate, in ``g``'s precision (float32 or better)."""
    return -torch.expm1(upcast(g))


class HGRN2Gate(nn.Module):
    """Per-channel log forget gate ``g = log(b + (1 - b) sigmoid(W x))`` [B, T, H, K], ``b = lower_bound``
    in [0, 1): ``g = logsigmoid(W x)`` for ``b = 0``."""

    def __init__(self, hidden_size: int, num_heads: int, head_k_dim: int, lower_bound: float = 0.0):
        super().__init__()
        if not 0.0 <= lower_bound < 1.0:
            raise ValueError(f"lower_bound must be in [0, 1), got {lower_bound!r}")
        self.shape = (num_heads, head_k_dim)
        self.lower_bound = float(lower_bound)
        self.proj = nn.Linear(hidden_size, num_heads * head_k_dim, bias=False)

    def _log_forget(self, z: Tensor) -> Tensor:
        g = F.logsigmoid(upcast(z))
        b = self.lower_bound
        if b > 0:  # log(b + (1 - b) sigmoid(z)), without leaving log space
            g = torch.logaddexp(g.new_tensor(math.log(b)), math.log1p(-b) + g)
        return g.unflatten(-1, self.shape)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {"g": self._log_forget(self.proj(x))}

    def forward_stacked(self, params: dict[str, Tensor], x: Tensor) -> dict[str, Tensor]:
        return {"g": self._log_forget(_stacked_linear(x, params["proj.weight"]))}  # [N, M, H, K]


class HGRN2(Rule):
    name = "hgrn2"
    gates = (GateSpec("g", per_channel=True, neutral=0.0, domain="log_decay",
                      doc="per-channel log forget gate, <= 0; the key is 1 - exp(g)"),)
    uses_key = False
    doc = "S_t = Diag(f_t) S_{t-1} + (1 - f_t) v_t^T, f_t = exp(g_t) (the key is 1 - f_t)"

    def gate_module(self, hidden_size, num_heads, head_k_dim):
        return HGRN2Gate(hidden_size, num_heads, head_k_dim)

    def _step(self, q, k, v, S, gates, scale, position, opts):
        g = gates["g"]
        S = g.exp()[..., None] * S + outer(hgrn2_key(g), v)
        return read(q, S, scale), S

    def _chunk(self, q, k, v, gates, scale, S0, plan, opts):
        g = gates["g"]  # padding rows hold g = 0: key 0, no decay
        return gated_linear_chunk(q, hgrn2_key(g).to(q.dtype), v, g, scale, S0, plan)

    def kernel_inputs(self, k, gates):
        return hgrn2_key(gates["g"]).to(k.dtype), gates


register_rule(HGRN2())
