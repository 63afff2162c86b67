"""Router strategies: ``nn.Module``s that turn hidden states into a RoutingPlan.

* ``topk_softmax`` (the MoM paper): softmax over all memories, top-k, weights renormalised over the
  selected; optional Gaussian noise on the logits during training (selection only).
* ``topk_sigmoid``: sigmoid scores; selection by score + a non-learned per-memory bias that
  ``update_bias()`` nudges toward balanced load after each training step (DeepSeek-V3's
  auxiliary-loss-free balancing); weights = selected scores renormalised.
* ``dense``: every memory, softmax weights (the no-sparsity control; needs topk = num_memories).
* ``round_robin``: token at position t -> memories (t + j) mod M, j < k, equal weights (non-learned).
* ``hash``: a fixed hash of the token id -> memories (h + j) mod M, equal weights (Hash Layers).

``weights`` of the learned routers (``MoMConfig.router_weights``): ``"renormalized"`` divides the selected
memories' scores by their sum (the MoM paper; at top-1 the weight is exactly 1, so the task loss gives the
router no gradient); ``"unnormalized"`` keeps each selected memory's own score (its softmax probability over
all M memories, or its sigmoid score), as Switch Transformer does, so the task loss reaches the router at
any top-k. ``dense`` weights already sum to 1, so both give the same weights (they differ only under a
capacity limit, where ``"unnormalized"`` leaves the remaining slots' weights as they are). Non-learned
routers have equal weights and only ``"renormalized"``.

Padding (``mask`` False) gets no slot.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from momkit.routing.plan import RoutingPlan, slot_counts

Tensor = torch.Tensor


ROUTER_WEIGHTS = ("renormalized", "unnormalized")


class Router(nn.Module):
    name: ClassVar[str]
    learned: ClassVar[bool] = True
    needs_token_ids: ClassVar[bool] = False

    def __init__(self, hidden_size: int, num_memories: int, topk: int, noise_std: float = 0.0,
                 bias_update_rate: float = 1e-3, weights: str = "renormalized"):
        super().__init__()
        if weights not in ROUTER_WEIGHTS or (weights != "renormalized" and not self.learned):
            allowed = ROUTER_WEIGHTS if self.learned else ("renormalized",)
            raise ValueError(f"weights={weights!r} is invalid for router {self.name!r}: one of {', '.join(allowed)}")
        self.num_memories, self.topk, self.weights = num_memories, topk, weights
        if self.learned:
            self.proj = nn.Linear(hidden_size, num_memories, bias=False)

    def logits(self, x: Tensor) -> Tensor:
        return self.proj(x).to(torch.promote_types(x.dtype, torch.float32))

    def forward(self, x: Tensor, mask: Tensor, positions: Tensor, token_ids: Tensor | None) -> RoutingPlan:
        """x [B, T, D]; mask [B, T] bool (real tokens); positions [B, T] index among real tokens."""
        raise NotImplementedError

    def _selected_weights(self, scores: Tensor, indices: Tensor) -> Tensor:
        """The selected memories' scores [B, T, k], renormalised to sum 1 unless ``weights="unnormalized"``."""
        w = scores.gather(-1, indices)
        return w if self.weights == "unnormalized" else w / w.sum(-1, keepdim=True)

    def _plan(self, indices, weights, mask, probs=None, logits=None) -> RoutingPlan:
        kept = mask[..., None].expand_as(indices)
        return RoutingPlan(indices, weights * kept, kept, self.num_memories, probs, logits,
                           renormalized=self.weights == "renormalized")


class TopKSoftmax(Router):
    name = "topk_softmax"

    def __init__(self, hidden_size, num_memories, topk, noise_std=0.0, bias_update_rate=1e-3,
                 weights="renormalized"):
        super().__init__(hidden_size, num_memories, topk, weights=weights)
        self.noise_std = noise_std

    def forward(self, x, mask, positions, token_ids):
        logits = self.logits(x)
        probs = logits.softmax(-1)
        select = logits
        if self.training and self.noise_std > 0:
            select = logits + self.noise_std * torch.randn_like(logits)
        indices = select.topk(self.topk, dim=-1).indices
        return self._plan(indices, self._selected_weights(probs, indices), mask, probs, logits)


class TopKSigmoid(Router):
    name = "topk_sigmoid"

    def __init__(self, hidden_size, num_memories, topk, noise_std=0.0, bias_update_rate=1e-3,
                 weights="renormalized"):
        super().__init__(hidden_size, num_memories, topk, weights=weights)
        self.bias_update_rate = bias_update_rate
        self.register_buffer("bias", torch.zeros(num_memories))
        self.register_buffer("load_since_update", torch.zeros(num_memories))

    def forward(self, x, mask, positions, token_ids):
        logits = self.logits(x)
        scores = logits.sigmoid()
        indices = (scores.detach() + self.bias).topk(self.topk, dim=-1).indices
        if self.training:
            with torch.no_grad():
                real = mask[..., None].expand_as(indices)
                self.load_since_update += slot_counts(indices, real, self.load_since_update.numel())
        probs = scores / scores.sum(-1, keepdim=True)
        return self._plan(indices, self._selected_weights(scores, indices), mask, probs, logits)

    @torch.no_grad()
    def update_bias(self) -> None:
        """``bias_m += rate * sign(mean load - load_m)`` from the load seen since the last update."""
        load = self.load_since_update
        seen = (load.sum() > 0).to(load.dtype)  # no update without load (no wait for the device)
        self.bias += self.bias_update_rate * torch.sign(load.mean() - load) * seen
        load.zero_()


class Dense(Router):
    name = "dense"

    def forward(self, x, mask, positions, token_ids):
        logits = self.logits(x)
        probs = logits.softmax(-1)
        indices = torch.arange(self.num_memories, device=x.device).expand(*x.shape[:-1], -1)
        return self._plan(indices, probs, mask, probs, logits)


class RoundRobin(Router):
    name = "round_robin"
    learned = False

    def forward(self, x, mask, positions, token_ids):
        j = torch.arange(self.topk, device=x.device)
        indices = (positions[..., None] + j) % self.num_memories
        weights = torch.full(indices.shape, 1.0 / self.topk, device=x.device, dtype=_weight_dtype(x))
        return self._plan(indices, weights, mask)


class Hash(Router):
    name = "hash"
    learned = False
    needs_token_ids = True

    def forward(self, x, mask, positions, token_ids):
        # Knuth's multiplicative hash; the high bits of the 32-bit product are the well-mixed ones
        h = ((token_ids.long() * 2654435761) % (1 << 32)) >> 16
        j = torch.arange(self.topk, device=x.device)
        indices = (h[..., None] + j) % self.num_memories
        weights = torch.full(indices.shape, 1.0 / self.topk, device=x.device, dtype=_weight_dtype(x))
        return self._plan(indices, weights, mask)


def _weight_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)
