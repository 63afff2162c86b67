"""Memories of trained models: their final states, how alike they are, their effective rank, which
memory answered each MQAR query, and what is lost when one memory is ablated.

    states = memory_states(model, inputs)                  # per layer [B, M', H, K, V] (M' = M + shared)
    state_similarity(states[0]); effective_rank(states[0])
    report = query_report(model, inputs, labels, layer=1)    # one row per MQAR query
    with ablate_memory(model, memory=2, layer=0):           # memory 2 of layer 0 neither written nor read
        out = model(inputs)
    ablation_effect(model, inputs, labels)                  # every memory of every layer, one at a time

**Ablation** zeroes one memory without touching ``momkit/layers``: a forward hook on the layer's router
marks every slot that selected memory m as not kept (so m is never written, its state stays zero, and
its read is zero), leaving the token's other slots and their weights as they were (no
renormalisation: the memory's contribution is removed, nothing else changes). The shared memory has no
router slot; its value projection's weight is zeroed inside the ``with`` block (and restored after), so
``v = 0``, which, from the zero initial state, keeps that memory at zero for every rule (``v = 0`` writes
nothing: the delta rules and titans correct towards 0 from 0) and makes its read zero. Both act in
``forward`` and in decoding ``step`` (which runs the memories from stacked copies of their weights,
re-copied when a weight changes in place).

Axis letters: B batch, T time, M' memories (routed, then shared), H heads, K key dim, V value dim.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from momkit.analysis.routing import QUERY, mqar_roles
from momkit.layers import MoMLayer
from momkit.routing import RoutingPlan
from momkit.tasks import IGNORE_INDEX

Tensor = torch.Tensor


def mom_layers(model) -> list[int]:
    """Indices of the blocks of a ``MoMLM`` whose mixer is a ``MoMLayer``."""
    return [i for i, b in enumerate(model.blocks) if isinstance(b.mixer, MoMLayer)]


def _layer(model, layer: int | None) -> MoMLayer:
    if isinstance(model, MoMLayer):
        return model
    if layer is None:
        raise ValueError("layer is required for a model (the block index of a MoM layer)")
    if not 0 <= layer < len(model.blocks) or not isinstance(model.blocks[layer].mixer, MoMLayer):
        raise ValueError(f"layer={layer} is not a MoM layer of this model (MoM layers: {mom_layers(model)})")
    return model.blocks[layer].mixer


def memory_names(layer: MoMLayer) -> list[str]:
    """``["0", "1", ..., "shared"]``: the memories of a layer in cache order."""
    return [str(m) for m in range(layer.cfg.num_memories)] + (["shared"] if layer.cfg.shared_memory else [])


# ----------------------------------------------------------------------------------------- states
@torch.no_grad()
def memory_states(model, inputs: Tensor, attention_mask: Tensor | None = None) -> list[Tensor | None]:
    """Final memory matrices after reading ``inputs``, per block: ``[B, M', H, K, V]`` (the matrix that
    queries read, ``rule.memory``; the shared memory last), None for blocks that are not MoM layers."""
    was_training = model.training
    model.eval()
    try:
        out = model(inputs, attention_mask=attention_mask, use_cache=True)
    finally:
        model.train(was_training)
    result = []
    for block, cache in zip(model.blocks, out.cache):
        if not isinstance(block.mixer, MoMLayer):
            result.append(None)
            continue
        B, Mp = cache.states.shape[:2]
        mem = block.mixer.rule.memory(cache.states.flatten(0, 1))
        result.append(mem.reshape(B, Mp, *mem.shape[1:]))
    return result


def state_similarity(states: Tensor) -> Tensor:
    """``[M', M']``: cosine similarity of the memories' flattened states (all heads), averaged over the
    batch; a memory whose state is zero in a sequence (no token routed to it) is left out of that
    sequence's pairs (NaN if it is empty in every sequence)."""
    flat = states.double().flatten(2)  # [B, M', H*K*V]
    norm = flat.norm(dim=-1)
    unit = flat / norm.clamp_min(1e-300)[..., None]
    cos = unit @ unit.transpose(1, 2)
    valid = (norm[:, :, None] > 0) & (norm[:, None, :] > 0)
    cos = torch.where(valid, cos, torch.zeros_like(cos))
    count = valid.sum(0)
    return torch.where(count > 0, cos.sum(0) / count.clamp_min(1), torch.full_like(cos[0], math.nan))


def effective_rank(states: Tensor) -> Tensor:
    """Effective rank (Roy & Vetterli 2007) of every matrix in ``[..., K, V]``: ``exp`` of the entropy of
    the normalised singular values; ``r`` for ``r`` equal singular values, 1 for rank one, 0 for a zero
    matrix."""
    s = torch.linalg.svdvals(states.double())
    total = s.sum(-1, keepdim=True)
    p = s / total.clamp_min(1e-300)
    ent = -(torch.where(p > 0, p * p.clamp_min(1e-300).log(), torch.zeros_like(p))).sum(-1)
    return torch.where(total[..., 0] > 0, ent.exp(), torch.zeros_like(ent))


def state_table(states: Tensor, names: list[str] | None = None) -> list[dict]:
    """One record per memory: mean effective rank over sequences and heads (sequences where the memory
    is empty left out), mean Frobenius norm, and the fraction of sequences in which it is empty."""
    er = effective_rank(states)  # [B, M', H]
    norm = states.double().flatten(3).norm(dim=-1)  # [B, M', H]
    empty = norm.sum(-1) == 0  # [B, M']
    out = []
    for m in range(states.shape[1]):
        used = ~empty[:, m]
        out.append({
            "memory": names[m] if names else str(m),
            "effective_rank": float(er[used, m].mean()) if used.any() else math.nan,
            "norm": float(norm[used, m].mean()) if used.any() else math.nan,
            "empty_fraction": float(empty[:, m].double().mean()),
        })
    return out


# ----------------------------------------------------------------------------------------- MQAR queries
@torch.no_grad()
def query_report(model, inputs: Tensor, labels: Tensor, layer: int, num_passes: int = 1) -> dict[str, np.ndarray]:
    """One row per MQAR query (supervised position): ``example``, ``position``, ``correct`` (the model's
    argmax equals the label), ``memory`` (the memory the query read with the largest weight at ``layer``:
    the one that answered), ``weight`` (that weight), ``value_memory`` (the top-weight memory of the value
    token of the queried pair, the token whose write stores the association) and ``same_memory`` (whether
    the query read any memory the value token wrote). Arrays of equal length, ready for a DataFrame."""
    _layer(model, layer)  # checks that ``layer`` is a MoM layer
    roles = mqar_roles(inputs, labels, num_passes=num_passes)
    n = int((roles[0] == QUERY).sum())
    was_training = model.training
    model.eval()
    try:
        out = model(inputs)
    finally:
        model.train(was_training)
    plan = out.aux[layer].plan
    ex, pos = (labels != IGNORE_INDEX).nonzero(as_tuple=True)
    correct = out.logits.argmax(-1)[ex, pos] == labels[ex, pos]
    # the queried pair: the key of the first pass equal to the query token; its value sits right after it
    block = inputs[ex, : 2 * n : 2]  # [Q, n] keys of the first pass
    match = block == inputs[ex, pos][:, None]
    if not bool(match.any(1).all()):
        raise ValueError("a query token matches no key of the key-value block: these are not MQAR inputs")
    value_pos = 2 * match.double().argmax(1) + 1
    w = plan.weights * plan.kept
    top = w.argmax(-1)  # [B, T]
    q_mem = plan.indices.gather(-1, top[..., None])[..., 0]
    sel = torch.nn.functional.one_hot(plan.indices, plan.num_memories) * plan.kept[..., None]
    sel = sel.sum(2) > 0  # [B, T, M] memories written / read by each token
    same = (sel[ex, pos] & sel[ex, value_pos]).any(-1)
    cols = {
        "example": ex, "position": pos, "correct": correct, "memory": q_mem[ex, pos],
        "weight": w.gather(-1, top[..., None])[..., 0][ex, pos], "value_memory": q_mem[ex, value_pos],
        "same_memory": same,
    }
    return {name: col.detach().cpu().numpy() for name, col in cols.items()}


def recall_by_memory(report: dict[str, np.ndarray], num_memories: int) -> list[dict]:
    """Per memory: how many queries it answered (top weight), their accuracy, and the fraction of them
    whose value token wrote the same memory."""
    out = []
    for m in range(num_memories):
        sel = report["memory"] == m
        k = int(sel.sum())
        out.append({"memory": m, "queries": k, "share": k / max(len(sel), 1),
                    "accuracy": float(report["correct"][sel].mean()) if k else math.nan,
                    "same_memory": float(report["same_memory"][sel].mean()) if k else math.nan})
    return out


# ----------------------------------------------------------------------------------------- ablation
def _drop_memory(plan: RoutingPlan, memory: int) -> RoutingPlan:
    keep = plan.indices != memory
    return RoutingPlan(plan.indices, plan.weights * keep, plan.kept & keep, plan.num_memories, plan.probs,
                       plan.logits, plan.dropped, plan.renormalized)


@contextmanager
def ablate_memory(model, memory: int | str, layer: int | None = None) -> Iterator[None]:
    """Inside the ``with`` block, memory ``memory`` (an index, or ``"shared"``) of the MoM layer ``layer``
    of a ``MoMLM`` (or of a ``MoMLayer`` given directly) is neither written nor read: its state stays zero
    and its read contributes 0, every other slot keeps its weight. See the module docstring."""
    mixer = _layer(model, layer)
    M = mixer.cfg.num_memories
    if memory == "shared" or (memory == M and mixer.cfg.shared_memory):
        if not mixer.cfg.shared_memory:
            raise ValueError("memory='shared': this layer has no shared memory")
        weight = mixer.shared.v_proj.weight
        saved = weight.detach().clone()
        with torch.no_grad():
            weight.zero_()
        try:
            yield
        finally:
            with torch.no_grad():
                weight.copy_(saved)
        return
    else:
        if not isinstance(memory, int) or not 0 <= memory < M:
            raise ValueError(f"memory must be an int in [0, {M}) or 'shared', got {memory!r}")
        handle = mixer.router.register_forward_hook(lambda mod, args, plan: _drop_memory(plan, memory))
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def _accuracy(model, inputs: Tensor, labels: Tensor) -> tuple[float, Tensor]:
    logits = model(inputs).logits
    sup = labels != IGNORE_INDEX
    hit = logits.argmax(-1)[sup] == labels[sup]
    return float(hit.double().mean()), hit


@torch.no_grad()
def ablation_effect(model, inputs: Tensor, labels: Tensor, layers: list[int] | None = None) -> list[dict]:
    """Accuracy on the supervised positions with each memory of each MoM layer ablated in turn. One
    record per (layer, memory): ``accuracy``, ``baseline``, ``delta`` (= accuracy - baseline), ``load``
    (the memory's share of that layer's routed slots on these inputs; NaN for the shared memory) and the
    accuracy with and without the ablation on the queries that read the memory at that layer
    (``reading_*``) and on those that do not (``other_*``)."""
    was_training = model.training
    model.eval()
    try:
        base, base_hit = _accuracy(model, inputs, labels)
        plans = [a.plan if a is not None else None for a in model(inputs).aux]
        sup = labels != IGNORE_INDEX
        records = []
        for li in (mom_layers(model) if layers is None else layers):
            mixer = _layer(model, li)
            plan = plans[li]
            sel = (torch.nn.functional.one_hot(plan.indices, plan.num_memories) * plan.kept[..., None]).sum(2) > 0
            counts = sel.sum((0, 1)).double()
            for m, name in enumerate(memory_names(mixer)):
                shared = name == "shared"
                with ablate_memory(model, "shared" if shared else m, li):
                    acc, hit = _accuracy(model, inputs, labels)
                reading = torch.ones_like(base_hit) if shared else sel[..., m][sup]
                rec = {"layer": li, "memory": name, "accuracy": acc, "baseline": base, "delta": acc - base,
                       "load": math.nan if shared else float(counts[m] / counts.sum())}
                for part, mask in (("reading", reading), ("other", ~reading)):
                    k = int(mask.sum())
                    rec[f"{part}_queries"] = k
                    rec[f"{part}_baseline"] = float(base_hit[mask].double().mean()) if k else math.nan
                    rec[f"{part}_accuracy"] = float(hit[mask].double().mean()) if k else math.nan
                records.append(rec)
    finally:
        model.train(was_training)
    return records


# ----------------------------------------------------------------------------------------- token routing
@torch.no_grad()
def token_routing_table(model) -> Tensor:
    """``[vocab, k]``: the memories the first block's router picks for every token id. In the first block
    a token's hidden state is its (normed) embedding alone, so its routing does not depend on the context;
    only there is such a table exact. Position-based routers (``round_robin``) have none."""
    if not isinstance(model.blocks[0].mixer, MoMLayer):
        raise ValueError("the first block is not a MoM layer")
    block = model.blocks[0]
    router = block.mixer.router
    if block.mixer.cfg.router == "round_robin":
        raise ValueError("router 'round_robin' routes by position, not by token: it has no token table")
    V = model.embed.num_embeddings
    ids = torch.arange(V)[None]
    x = block.norm1(model.embed(ids))
    mask = torch.ones(1, V, dtype=torch.bool)
    was_training = router.training
    router.eval()
    try:
        plan = router(x, mask, torch.zeros(1, V, dtype=torch.long), ids)
    finally:
        router.train(was_training)
    order = (plan.weights[0]).argsort(-1, descending=True)
    return plan.indices[0].gather(-1, order)
