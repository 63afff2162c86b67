"""Lightning Attention (TransNormerLLM, Qin et al. 2023; Lightning Attention-2, Qin et al. 2024):
``S_t = lambda_h S_{t-1} + k_t v_t^T`` with a constant, non-learned decay ``lambda_h`` per head.

The recurrence is RetNet's (``momkit.rules.retnet``: any per-head log decay ``g`` ``[B, T, H]``); only the
decay schedule differs. Lightning Attention's decays are ``lambda_h = exp(-s_h)`` with ALiBi's head slopes
``s_h = 2^(-8 (h + 1) / H)`` for H a power of two (for other H: the slopes of the largest power of two
``P < H``, then every other slope of ``2P``), as built by ``_build_slope_tensor`` in the official code
(github.com/OpenNLPLab/lightning-attention, ``lightning_attn/utils/utils.py``). TransNormerLLM and
MiniMax-01 scale the slopes of layer ``l`` of ``L`` by ``1 - l / (L - 1) + 1e-5`` (less decay deeper);
a gate module does not know its layer, so the rule's gate module takes the first layer's slopes
(``depth_scale = 1``); ``LightningDecay(num_heads, depth_scale)`` builds any other layer's.
"""

from __future__ import annotations

import torch

from momkit.rules import register_rule
from momkit.rules.gates import FixedDecay
from momkit.rules.retnet import RetNet


def lightning_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi's head slopes as Lightning Attention builds them, float64 ``[H]``, largest first."""
    if not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")

    def power_of_two(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]

    if num_heads & (num_heads - 1) == 0:
        slopes = power_of_two(num_heads)
    else:
        p = 1 << (num_heads.bit_length() - 1)  # the largest power of two below num_heads
        slopes = power_of_two(p) + power_of_two(2 * p)[0::2][: num_heads - p]
    return torch.tensor(slopes, dtype=torch.float64)


class LightningDecay(FixedDecay):
    """Lightning Attention's fixed per-head log decays ``g_h = -depth_scale * s_h`` (``s_h`` the slopes of
    ``lightning_slopes``), not learned, broadcast to [B, T, H]."""

    def __init__(self, num_heads: int, depth_scale: float = 1.0):
        super().__init__(num_heads)
        self.g = (-depth_scale * lightning_slopes(num_heads)).float()  # replaces RetNet's decays (a buffer)


class Lightning(RetNet):
    name = "lightning"
    doc = "S_t = lambda_h S_{t-1} + k_t v_t^T (Lightning Attention's fixed per-head decay)"

    def gate_module(self, hidden_size, num_heads, head_k_dim):
        return LightningDecay(num_heads)


register_rule(Lightning())
