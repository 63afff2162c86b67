"""RoutingPlan: which memories each token writes and reads, with what weights; and its telemetry.

Axis letters: B batch, T time, M memories, k slots per token (top-k).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

Tensor = torch.Tensor


def slot_counts(indices: Tensor, selected: Tensor, num_memories: int) -> Tensor:
    """``[M]`` int64: how many of the slots ``indices [..., k]`` where ``selected [..., k]`` (bool) hold each
    memory. A comparison with every memory and a sum: an ``index_add_`` into M counters makes every slot an
    atomic add on a handful of addresses (on a GPU, tens of microseconds per call at a batch of 32k tokens)."""
    memories = torch.arange(num_memories, device=indices.device)
    hits = (indices[..., None] == memories) & selected[..., None]
    return hits.reshape(-1, num_memories).sum(0)


@dataclass
class RoutingPlan:
    """A router's decision for a batch.

    ``indices`` [B, T, k] memory of each slot; ``weights`` [B, T, k] mixing weight of each slot's read;
    ``kept`` [B, T, k] whether the slot is used (False for padding and for slots dropped by capacity).
    ``probs`` [B, T, M] the router's distribution over memories (None for non-learned routers),
    ``logits`` [B, T, M] the raw router logits (None for non-learned routers).
    ``renormalized``: whether a token's weights sum to 1 over its kept slots (False for a learned
    router's ``weights="unnormalized"``: each weight is the router's score of that memory).
    """

    indices: Tensor
    weights: Tensor
    kept: Tensor
    num_memories: int
    probs: Tensor | None = None
    logits: Tensor | None = None
    dropped: int = 0
    renormalized: bool = True

    @property
    def topk(self) -> int:
        return self.indices.shape[-1]

    def apply_capacity(self, capacity_factor: float, lengths: Tensor) -> RoutingPlan:
        """Each memory accepts at most ``ceil(capacity_factor * L_b * k / M)`` slots of sequence b
        (``L_b`` its number of real tokens), first come first served in time order; weights of a
        token that lost slots are renormalised over its remaining slots (when the plan is
        ``renormalized``; otherwise the remaining slots keep their weights)."""
        k = self.indices.shape[-1]
        M = self.num_memories
        cap = torch.ceil(capacity_factor * lengths.to(torch.float64) * k / M).long()  # [B]
        onehot = torch.nn.functional.one_hot(self.indices, M) * self.kept[..., None]  # [B, T, k, M]
        # slots of one token never share a memory, so the running count per (sequence, memory) in
        # time order is a cumulative sum over T of the per-token counts
        before = onehot.sum(2).cumsum(1) - onehot.sum(2)  # [B, T, M]: slots already accepted earlier
        rank = (before[:, :, None, :] * onehot).sum(-1)  # [B, T, k]
        kept = self.kept & (rank < cap[:, None, None])
        weights = self.weights * kept
        if self.renormalized:
            total = weights.sum(-1, keepdim=True)
            weights = torch.where(total > 0, weights / total.clamp_min(1e-30), torch.zeros_like(weights))
        dropped = int((self.kept & ~kept).sum())
        return RoutingPlan(self.indices, weights, kept, M, self.probs, self.logits, self.dropped + dropped,
                           self.renormalized)


class RoutingStats:
    """Telemetry of one layer for one batch (detached numbers, for logging and analysis).

    ``load`` (fraction of kept slots that went to each memory), ``entropy`` (mean entropy of the router
    distribution per real token, nats; nan if not learned), ``max_load``, ``min_load``,
    ``dead_memories`` (memories that received no slot), ``dropped_slots`` (by capacity) and
    ``dropped_fraction``. They are computed from the plan on first use, on its device, and read back then: a
    forward pass never waits for its telemetry, and a training step whose telemetry nobody reads (all but the
    logged ones) launches nothing for it."""

    def __init__(self, plan: RoutingPlan, mask: Tensor | None, extra: dict | None = None):
        self._plan, self._mask = plan, mask
        self.dropped_slots = plan.dropped
        self.extra = {} if extra is None else extra
        self._values: dict | None = None

    @staticmethod
    def from_plan(plan: RoutingPlan, mask: Tensor | None) -> RoutingStats:
        probs = None if plan.probs is None else plan.probs.detach()  # the stats hold no autograd graph
        return RoutingStats(RoutingPlan(plan.indices, plan.weights.detach(), plan.kept, plan.num_memories, probs,
                                        None, plan.dropped, plan.renormalized), mask)

    def _device_values(self) -> tuple[Tensor, Tensor | None]:
        plan, mask = self._plan, self._mask
        with torch.no_grad():
            counts = slot_counts(plan.indices, plan.kept, plan.num_memories).to(torch.float64)
            entropy = None
            if plan.probs is not None:
                p = plan.probs.double().clamp_min(1e-30)
                ent = -(p * p.log()).sum(-1)
                entropy = ent.mean() if mask is None else (ent * mask).sum() / mask.sum()
        return counts, entropy

    def _read(self) -> dict:
        if self._values is None:
            counts_t, entropy_t = self._device_values()
            self._plan = self._mask = None  # read once: the plan's tensors go
            counts = counts_t.tolist()
            total = max(sum(counts), 1.0)
            load = [c / total for c in counts]
            n_slots = int(sum(counts)) + self.dropped_slots
            self._values = {
                "load": load, "entropy": math.nan if entropy_t is None else float(entropy_t),
                "max_load": max(load), "min_load": min(load),
                "dead_memories": sum(1 for c in counts if c == 0),
                "dropped_fraction": self.dropped_slots / max(n_slots, 1),
            }
        return self._values

    @property
    def load(self) -> list[float]:
        return self._read()["load"]

    @property
    def entropy(self) -> float:
        return self._read()["entropy"]

    @property
    def max_load(self) -> float:
        return self._read()["max_load"]

    @property
    def min_load(self) -> float:
        return self._read()["min_load"]

    @property
    def dead_memories(self) -> int:
        return self._read()["dead_memories"]

    @property
    def dropped_fraction(self) -> float:
        return self._read()["dropped_fraction"]

    def as_dict(self) -> dict:
        return {"load": self.load, "entropy": self.entropy, "max_load": self.max_load, "min_load": self.min_load,
                "dead_memories": self.dead_memories, "dropped_slots": self.dropped_slots,
                "dropped_fraction": self.dropped_fraction, **self.extra}
