"""Routing analysis: where tokens go, with what weight, by token role, and which memories go together.

Everything here reads a ``RoutingPlan`` (``indices``, ``weights``, ``kept`` ``[B, T, k]``, ``probs``
``[B, T, M]``); ``model_plans`` gets one per MoM layer from a ``MoMLM``. The shared memory is not part
of a plan (every token writes it with weight 1), so it never appears in these tables.

Axis letters: B batch, T time, k slots per token (top-k), M routed memories, R token roles.
See docs/analysis.md for the definitions.
"""

from __future__ import annotations

import math

import torch

from momkit.routing import RoutingPlan
from momkit.tasks import IGNORE_INDEX

Tensor = torch.Tensor

ROLES = ("key", "value", "query", "filler")
KEY, VALUE, QUERY, FILLER = range(4)


# ----------------------------------------------------------------------------------------- per token
def assignment(plan: RoutingPlan, weighted: bool = True) -> Tensor:
    """``[B, T, M]``: the routing weight of every (token, memory), 0 where the memory is not selected
    (``weighted=False``: 1 for a selected, kept slot). Row sums are the tokens' summed slot weights
    (0 for padding; for a plan with renormalised weights 1 for every real token, less than 1 only where capacity
    dropped slots; with ``router_weights="unnormalized"`` the router's probability of the selected memories)."""
    B, T, _ = plan.indices.shape
    w = plan.weights * plan.kept if weighted else plan.kept.to(plan.weights.dtype)
    out = torch.zeros(B, T, plan.num_memories, dtype=w.dtype, device=w.device)
    return out.scatter_add_(-1, plan.indices, w.detach())


def heatmap(plan: RoutingPlan, example: int = 0, weighted: bool = True) -> Tensor:
    """``[T, M]``: heatmap data (position x memory) of one sequence of the batch."""
    return assignment(plan, weighted)[example]


def router_entropy(plan: RoutingPlan, normalized: bool = False) -> Tensor:
    """``[B, T]``: entropy (nats) of the router distribution ``probs`` at every token; divided by
    ``log M`` when ``normalized`` (1 = uniform, 0 = one memory). NaN for non-learned routers (no
    ``probs``) and for padding."""
    if plan.probs is None:
        return torch.full(plan.indices.shape[:2], math.nan, dtype=torch.float64, device=plan.indices.device)
    p = plan.probs.detach().double().clamp_min(1e-300)
    ent = -(p * p.log()).sum(-1)
    if normalized:
        ent = ent / math.log(plan.num_memories) if plan.num_memories > 1 else torch.zeros_like(ent)
    return ent.masked_fill(~plan.kept.any(-1), math.nan)


def load(plan: RoutingPlan) -> Tensor:
    """``[M]``: fraction of kept slots that went to each memory (sums to 1)."""
    counts = assignment(plan, weighted=False).sum((0, 1)).double()
    return counts / counts.sum().clamp_min(1.0)


def coselection(plan: RoutingPlan, normalize: bool = True) -> Tensor:
    """``[M, M]``: ``C[a, b]`` = number of tokens that selected both a and b (``a != b``); the diagonal
    counts the tokens that selected a. With ``normalize``, divided by the number of real tokens, so
    ``C[a, b]`` is the probability that a token selects both. Zero off the diagonal for top-1."""
    s = assignment(plan, weighted=False).double().flatten(0, 1)  # [B*T, M]
    C = s.T @ s
    if normalize:
        C = C / plan.kept.any(-1).sum().clamp_min(1)
    return C


# ----------------------------------------------------------------------------------------- MQAR roles
def mqar_roles(inputs: Tensor, labels: Tensor, num_kv_pairs: int | None = None, num_passes: int = 1) -> Tensor:
    """``[N, T]`` role of every MQAR position: ``KEY`` / ``VALUE`` in the key-value block (positions
    ``< C = 2 n p``, keys at even offsets), ``QUERY`` at the supervised positions after it, ``FILLER``
    elsewhere (see momkit/tasks/mqar.py). ``num_kv_pairs`` defaults to the number of supervised
    positions per example (exactly ``n`` in MQAR); ``num_passes`` (``p``) cannot be recovered from the
    data in general, so pass it when the task repeats the block."""
    if inputs.shape != labels.shape or inputs.dim() != 2:
        raise ValueError(f"inputs and labels must both be [N, T], got {tuple(inputs.shape)} and {tuple(labels.shape)}")
    supervised = labels != IGNORE_INDEX
    per_row = supervised.sum(1)
    if num_kv_pairs is None:
        if per_row.numel() == 0 or not bool((per_row == per_row[0]).all()):
            raise ValueError("num_kv_pairs=None needs the same number of supervised positions in every example; "
                             f"got counts {sorted(set(per_row.tolist()))}")
        num_kv_pairs = int(per_row[0])
    C = 2 * num_kv_pairs * num_passes
    T = inputs.shape[1]
    if C > T:
        raise ValueError(f"num_kv_pairs={num_kv_pairs}, num_passes={num_passes}: the key-value block (2*n*p = {C}) "
                         f"is longer than seq_len={T}")
    if bool(supervised[:, :C].any()):
        raise ValueError(f"labels are supervised inside the key-value block (positions < {C}): these are not MQAR "
                         "labels, or num_kv_pairs / num_passes are wrong")
    pos = torch.arange(T, device=inputs.device).expand_as(inputs)
    roles = torch.full_like(inputs, FILLER)
    roles[(pos < C) & (pos % 2 == 0)] = KEY
    roles[(pos < C) & (pos % 2 == 1)] = VALUE
    roles[supervised] = QUERY
    return roles


def role_assignment(plan: RoutingPlan, roles: Tensor, num_roles: int = len(ROLES), weighted: bool = False,
                    normalize: bool = True) -> Tensor:
    """``[R, M]``: how the slots of each token role are spread over the memories. Counts of kept slots
    (``weighted``: summed routing weights); with ``normalize`` each row sums to 1 (NaN for a role with
    no token). ``roles`` ``[B, T]`` int, e.g. from ``mqar_roles``."""
    if roles.shape != plan.indices.shape[:2]:
        raise ValueError(f"roles must have the plan's [B, T] = {list(plan.indices.shape[:2])}, got {list(roles.shape)}")
    a = assignment(plan, weighted).double().flatten(0, 1)  # [B*T, M]
    onehot = torch.nn.functional.one_hot(roles.flatten().long(), num_roles).double()  # [B*T, R]
    table = onehot.T @ a
    if normalize:
        table = table / table.sum(1, keepdim=True)
    return table


def mutual_information(counts: Tensor) -> float:
    """Mutual information (nats) between the row and the column variable of a table of counts, e.g.
    ``role_assignment(..., normalize=False)``: 0 when memories ignore the role, up to
    ``min(log R, log M)`` when each role has memories of its own."""
    p = counts.double() / counts.sum()
    pr, pc = p.sum(1, keepdim=True), p.sum(0, keepdim=True)
    nz = p > 0
    return float((p[nz] * (p[nz] / (pr @ pc)[nz]).log()).sum())


# ----------------------------------------------------------------------------------------- models
@torch.no_grad()
def model_plans(model, inputs: Tensor, attention_mask: Tensor | None = None) -> list[RoutingPlan | None]:
    """One ``RoutingPlan`` per block of a ``MoMLM`` (None for blocks without a MoM mixer), in eval mode."""
    was_training = model.training
    model.eval()
    try:
        out = model(inputs, attention_mask=attention_mask)
    finally:
        model.train(was_training)
    return [a.plan if a is not None else None for a in out.aux]
