"""TTT-Linear (Sun et al. 2024, "Learning to (Learn at Test Time)"): the memory is trained online by
mini-batch gradient descent on ``1/2 ||M^T k - v||^2``, with no momentum and no forgetting.

Tokens are grouped in mini-batches of ``mini_batch`` tokens (default 16, TTT's) counted from the start of
each sequence or segment; ``M0`` is the memory just before the mini-batch's first token. For each token::

    u_t = k_t (M0^T k_t - v_t)^T          gradient at M0
    M_t = M_{t-1} - theta_t u_t
    o_t = scale * M_t^T q_t

This is titans (``momkit.rules.titans``) with ``alpha = eta = 0``, and its chunked path and kernels are
titans' with those gates. The state keeps titans' layout ``[N, H, 3, K, V]``: slot 0 the memory ``M``,
slot 1 the last token's update ``-theta_t u_t`` (titans' momentum with ``eta = 0``), slot 2 ``M0``.
``mini_batch = 1`` is token-level gradient descent, equal to deltanet with ``beta = theta``.

Gate module: ``theta = sigmoid(w(x) + b)`` per head, ``b = 0`` (TTT's learnable learning rate
``base_lr * sigmoid(w x + b) / head_dim`` with ``base_lr = 1`` and ``b = 0`` at init; with the L2-normalised
keys here ``||k||^2 = 1`` rather than about ``head_dim``, so the ``1 / head_dim`` is left out). Not taken
from TTT-Linear: the LayerNorm and residual inside its inner model (which make the update nonlinear), its
``1 / t`` scaling of the learning rate by the token's place in the mini-batch, and its learned initial
memory (here the initial state, zero by default).
"""

from __future__ import annotations

import torch

from momkit.rules import register_rule
from momkit.rules.base import GateSpec
from momkit.rules.gates import SigmoidGates
from momkit.rules.titans import Titans


class TTT(Titans):
    name = "ttt"
    gates = (GateSpec("theta", per_channel=False, neutral=0.0, domain="unit", doc="inner learning rate"),)
    option_variants = ({}, {"mini_batch": 1}, {"mini_batch": 4})
    doc = "mini-batch gradient descent on 1/2 ||M^T k - v||^2, step theta (titans with alpha = eta = 0)"

    def gate_module(self, hidden_size, num_heads, head_k_dim):
        return SigmoidGates(hidden_size, num_heads, {"theta": 0.0})

    def _step(self, q, k, v, state, gates, scale, position, opts):
        # titans' step with alpha = eta = 0: the state's middle slot holds the last token's update
        return super()._step(q, k, v, state, self._titans_gates(gates), scale, position, opts)

    def _chunk(self, q, k, v, gates, scale, S0, plan, opts):
        return super()._chunk(q, k, v, self._titans_gates(gates), scale, S0, plan, opts)

    def kernel_inputs(self, k, gates):
        return k, self._titans_gates(gates)

    @staticmethod
    def _titans_gates(gates: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        zero = torch.zeros_like(gates["theta"])
        return {"theta": gates["theta"], "alpha": zero, "eta": zero}


register_rule(TTT())
