"""Router losses.

Load balancing (the MoM paper's code, i.e. the Switch / Mixtral form): with ``f_e`` the number of
top-k slots routed to memory e divided by the number of tokens (so ``sum_e f_e = k``) and ``P_e``
the mean router probability of e, ``loss = M * sum_e f_e P_e``. It is computed from per-layer sums
(``BalanceStats``) so that a model can take it per layer or globally over all layers' tokens.
Router z-loss: ``mean_t logsumexp(logits_t)^2``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from momkit.routing.plan import RoutingPlan, slot_counts
from momkit.rules.base import upcast

Tensor = torch.Tensor


@dataclass
class BalanceStats:
    """Sums over one layer's real tokens: slot counts (no gradient) and router probabilities."""

    counts: Tensor  # [M] top-k slots per memory (before capacity)
    prob_sum: Tensor  # [M] sum of router probabilities (differentiable)
    tokens: Tensor  # [] number of real tokens

    @staticmethod
    def from_plan(plan: RoutingPlan, mask: Tensor) -> BalanceStats | None:
        if plan.probs is None:
            return None
        M = plan.num_memories
        routed = mask[..., None].expand_as(plan.indices)  # selections of real tokens, before capacity
        counts = slot_counts(plan.indices, routed, M).to(torch.float32)
        prob_sum = (upcast(plan.probs) * mask[..., None]).sum((0, 1))
        return BalanceStats(counts, prob_sum, mask.sum().float())


def load_balancing_loss(stats: list[BalanceStats]) -> Tensor:
    """``M * sum_e f_e P_e`` over the tokens of all given layers taken together."""
    counts = sum(s.counts for s in stats)
    prob_sum = sum(s.prob_sum for s in stats)
    tokens = sum(s.tokens for s in stats).clamp_min(1.0)
    M = counts.numel()
    return M * ((counts / tokens) * (prob_sum / tokens)).sum()


def z_loss(logits: Tensor, mask: Tensor) -> Tensor:
    """Router z-loss: mean over real tokens of ``logsumexp(logits)^2``."""
    z = torch.logsumexp(upcast(logits), dim=-1)
    return (z**2 * mask).sum() / mask.sum().clamp_min(1)  # 0 without real tokens; no wait for the device
