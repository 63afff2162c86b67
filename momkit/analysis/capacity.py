"""Capacity and interference of matrix memories, with no training: write N random key-value
associations, read them back, and measure what was lost.

    assoc = make_associations(trials=8, num=64, key_dim=32)
    idx = route(assoc, num_memories=4, router="random")               # [B, N, k]
    reads, memories = write_and_read("deltanet", assoc.keys, assoc.values, idx, num_memories=4)
    recall_metrics(reads, assoc.values)                                # error, accuracy, cosine
    compare_capacity("deltanet", sizes=[16, 32, 64], dim=32, num_memories=4)   # single / mixture / expanded
    X = crosstalk("deltanet", assoc.keys, assoc.values, idx, num_memories=4)   # [B, N, N]

**Writing.** Associations are the tokens of one sequence per memory, written with the rule's own
chunked path (or its recurrent token loop, ``impl="recurrent"``) from a zero state; each memory is one
segment of a packed call (``cu_seqlens``), exactly like the MoM layer's dispatch, so memories never see
each other's writes. An association routed to ``k`` memories is written to each of them.

**Reading.** After all writes, association i is read from the final memory matrix of each memory it
was written to, ``r_i = S^T k_i`` (``rule.memory(state)``, no ``K**-0.5`` scale), averaged over its
memories with equal weights.

**Gates** (``ideal_gates``): the rule's own update with the gates that make it a pure associative
memory, so that what is lost is interference, not forgetting: no decay (``g = 0``), full writes
(``beta = 1``, ``dt = 1``), titans with ``theta = 1, eta = 0, alpha = 0`` (plain mini-batch gradient
steps, mini-batch 16 as configured by the rule), ttt likewise with ``theta = 1``; RetNet and Lightning keep
their fixed, non-learned decay of the slowest head (``1 - 2**-5`` and ``exp(-2**-8)`` per token) because
the rules have no other. HGRN2 writes with the key ``1 - f`` (its forget gate), not the association's key:
with constant gates every association is written along the same key, and what it recalls is a decayed
average of the values (``g = ln(1/2)``: forget and key ``1/2``). Pass ``gates={...}`` to override.

Keys and values are unit vectors. Axis letters: B trials, N associations, K key dim, V value dim,
M memories, k memories per association. Definitions of every metric are in docs/analysis.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from momkit.rules import Rule, get_rule

Tensor = torch.Tensor

# The gates of each rule for a pure associative memory (see the module docstring).
IDEAL_GATES: dict[str, dict[str, float]] = {
    "linear_attn": {},
    "lightning": {"g": -(2.0**-8)},
    "retnet": {"g": math.log1p(-(2.0**-5))},
    "gla": {"g": 0.0},
    "mamba2": {"g": 0.0, "dt": 1.0},
    "hgrn2": {"g": math.log(0.5)},
    "deltanet": {"beta": 1.0},
    "gated_deltanet": {"g": 0.0, "beta": 1.0},
    "ttt": {"theta": 1.0},
    "titans": {"theta": 1.0, "alpha": 0.0, "eta": 0.0},
}
_GENERIC = {"log_decay": 0.0, "unit": 1.0, "nonnegative": 1.0}

KEY_DISTRIBUTIONS = ("gaussian", "orthonormal", "clustered")
ROUTERS = ("random", "balanced", "oracle", "linear")


def ideal_gates(rule: str | Rule, **overrides: float) -> dict[str, float]:
    """Constant gate values per gate name: ``IDEAL_GATES`` for the built-in rules; for a rule added
    later, no decay (log decays 0) and full strength (unit and non-negative gates 1)."""
    rule = get_rule(rule)
    values = dict(IDEAL_GATES.get(rule.name, {s.name: _GENERIC[s.domain] for s in rule.gates}))
    unknown = sorted(set(overrides) - set(rule.gate_names))
    if unknown:
        raise ValueError(f"gates {unknown} are not gates of rule {rule.name!r} (its gates: {list(rule.gate_names)})")
    values.update(overrides)
    return values


# ----------------------------------------------------------------------------------------- data
@dataclass
class Associations:
    """``keys`` ``[B, N, K]`` and ``values`` ``[B, N, V]``, unit vectors; ``clusters`` ``[B, N]`` the
    cluster of each key for clustered keys (else None)."""

    keys: Tensor
    values: Tensor
    clusters: Tensor | None = None

    @property
    def num(self) -> int:
        return self.keys.shape[1]


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def make_associations(trials: int, num: int, key_dim: int, value_dim: int | None = None, keys: str = "gaussian",
                      num_clusters: int = 4, spread: float = 1.0, seed: int = 0,
                      dtype: torch.dtype = torch.float64) -> Associations:
    """Random associations. ``keys``: ``"gaussian"`` (uniform on the sphere), ``"orthonormal"``
    (consecutive blocks of ``key_dim`` keys, each block an orthonormal basis: exact recall is possible up
    to ``N = key_dim``), or ``"clustered"`` (``num_clusters`` random unit centres, key =
    ``unit(centre + spread * noise / sqrt(K))``: keys of one cluster have cosine about ``1 / (1 + spread**2)``).
    Values are uniform on the sphere of dimension ``value_dim`` (default ``key_dim``)."""
    if keys not in KEY_DISTRIBUTIONS:
        raise ValueError(f"keys must be one of {KEY_DISTRIBUTIONS}, got {keys!r}")
    for name, val in (("trials", trials), ("num", num), ("key_dim", key_dim), ("num_clusters", num_clusters)):
        if not isinstance(val, int) or val < 1:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    V = key_dim if value_dim is None else value_dim
    gen = torch.Generator().manual_seed(seed)
    B, N, K = trials, num, key_dim
    clusters = None
    if keys == "gaussian":
        k = _unit(torch.randn(B, N, K, generator=gen, dtype=torch.float64))
    elif keys == "orthonormal":
        blocks = math.ceil(N / K)
        q, _ = torch.linalg.qr(torch.randn(B, blocks, K, K, generator=gen, dtype=torch.float64))
        k = q.transpose(-1, -2).reshape(B, blocks * K, K)[:, :N]  # rows of each Q: an orthonormal basis
    else:
        centres = _unit(torch.randn(B, num_clusters, K, generator=gen, dtype=torch.float64))
        clusters = torch.randint(0, num_clusters, (B, N), generator=gen)
        noise = torch.randn(B, N, K, generator=gen, dtype=torch.float64) / math.sqrt(K)
        k = _unit(centres.gather(1, clusters[..., None].expand(B, N, K)) + spread * noise)
    v = _unit(torch.randn(B, N, V, generator=gen, dtype=torch.float64))
    return Associations(k.to(dtype), v.to(dtype), clusters)


RouterFn = Callable[[Associations, int, int, torch.Generator], Tensor]


def route(assoc: Associations, num_memories: int, router: str | RouterFn = "random", topk: int = 1,
          seed: int = 0) -> Tensor:
    """``[B, N, k]`` memories of every association (``k = topk`` distinct memories).

    ``"random"``: uniform, independent of the key (a hash router); ``"balanced"``: association i ->
    ``(i + j) mod M`` (round robin, equal loads); ``"oracle"``: the key's cluster, ``(c + j) mod M``
    (clustered keys; an oracle that knows the data's structure); ``"linear"``: top-k of ``W k`` with a
    fixed random ``W`` ``[M, K]`` (a learned router's form at initialisation: it groups keys by direction).
    A callable ``router(assoc, num_memories, topk, generator)`` returning ``[B, N]`` or ``[B, N, k]``
    indices plugs in any other router (e.g. ``token_table_router`` for a trained model's router)."""
    if not isinstance(topk, int) or not 1 <= topk <= num_memories:
        raise ValueError(f"topk must be an int in [1, num_memories={num_memories}], got {topk!r}")
    B, N = assoc.keys.shape[:2]
    gen = torch.Generator().manual_seed(seed)
    j = torch.arange(topk)
    if callable(router):
        idx = router(assoc, num_memories, topk, gen)
        idx = idx[..., None] if idx.dim() == 2 else idx
    elif router == "random":
        idx = torch.rand(B, N, num_memories, generator=gen).argsort(-1)[..., :topk]
    elif router == "balanced":
        idx = (torch.arange(N)[:, None] + j).expand(B, N, topk) % num_memories
    elif router == "oracle":
        if assoc.clusters is None:
            raise ValueError("router='oracle' needs clustered keys (make_associations(keys='clustered'))")
        idx = (assoc.clusters[..., None] + j) % num_memories
    elif router == "linear":
        W = torch.randn(num_memories, assoc.keys.shape[-1], generator=gen, dtype=assoc.keys.dtype)
        idx = (assoc.keys @ W.T).topk(topk, -1).indices
    else:
        raise ValueError(f"router must be one of {ROUTERS} or a callable, got {router!r}")
    idx = idx.long()
    if idx.shape != (B, N, topk) or bool((idx < 0).any()) or bool((idx >= num_memories).any()):
        raise ValueError(f"router gave indices of shape {tuple(idx.shape)} with values outside [0, {num_memories}); "
                         f"expected [B, N, k] = {[B, N, topk]}")
    return idx


def token_table_router(table: Tensor, tokens: Tensor) -> RouterFn:
    """A router that gives each association a token drawn uniformly (with replacement) from ``tokens``
    and routes it by ``table[token]`` (``[vocab]`` or ``[vocab, k]`` memory indices), e.g. the routing of a
    trained model's first layer (``momkit.analysis.memories.token_routing_table``): the capacity that
    router's spread over those tokens allows."""
    table = table if table.dim() == 2 else table[:, None]
    tokens = torch.as_tensor(tokens).long()

    def router(assoc: Associations, num_memories: int, topk: int, gen: torch.Generator) -> Tensor:
        if table.shape[1] < topk:
            raise ValueError(f"the token table routes to {table.shape[1]} memories per token; topk={topk} asked")
        B, N = assoc.keys.shape[:2]
        pick = tokens[torch.randint(0, tokens.numel(), (B, N), generator=gen)]
        return table[pick][..., :topk]

    return router


# ----------------------------------------------------------------------------------------- write / read
def write_and_read(rule: str | Rule, keys: Tensor, values: Tensor, assignment: Tensor | None = None,
                   num_memories: int | None = None, gates: dict[str, float] | None = None,
                   rule_options: dict[str, Any] | None = None, impl: str = "chunked",
                   chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Write ``keys`` ``[B, N, K]`` -> ``values`` ``[B, N, V]`` into memories and read every key back.

    ``assignment`` ``[B, N]`` or ``[B, N, k]``: the memories each association is written to (default: all
    in memory 0). Returns ``(reads [B, N, V], memories [B, M, K, V])``: ``reads[b, i]`` is the mean over the
    association's memories of ``S_m^T k_i``; ``memories`` the final matrices that queries read. Gates are
    ``ideal_gates(rule, **gates)``, constant over tokens. ``chunk_size`` (chunked path) defaults to the
    longest memory's sequence rounded up to a power of two, between 16 and 64 (less padding for short
    segments; the result does not depend on it beyond rounding)."""
    rule = get_rule(rule)
    if keys.dim() != 3 or values.dim() != 3 or keys.shape[:2] != values.shape[:2]:
        raise ValueError(f"keys [B, N, K] and values [B, N, V] must share B and N, got {tuple(keys.shape)} and "
                         f"{tuple(values.shape)}")
    B, N, K = keys.shape
    V = values.shape[-1]
    if assignment is None:
        assignment = torch.zeros(B, N, 1, dtype=torch.long, device=keys.device)
    assignment = assignment[..., None] if assignment.dim() == 2 else assignment
    if assignment.shape[:2] != (B, N):
        raise ValueError(f"assignment must be [B, N] or [B, N, k] with [B, N] = {[B, N]}, got {list(assignment.shape)}")
    M = int(assignment.max()) + 1 if num_memories is None else num_memories
    if bool((assignment < 0).any()) or bool((assignment >= M).any()):
        raise ValueError(f"assignment holds memories outside [0, num_memories={M}): "
                         f"{sorted(set(assignment.flatten().tolist()))}")
    k = assignment.shape[-1]

    seg = (torch.arange(B, device=keys.device)[:, None, None] * M + assignment).flatten()  # [B*N*k]
    order = torch.argsort(seg, stable=True)  # by (trial, memory); association order kept inside
    assoc_of_row = order // k  # flat (b, i)
    kr = keys.reshape(B * N, K)[assoc_of_row][None, :, None]  # [1, R, 1, K]
    vr = values.reshape(B * N, V)[assoc_of_row][None, :, None]
    cu = torch.zeros(B * M + 1, dtype=torch.int64, device=keys.device)
    lengths = torch.bincount(seg, minlength=B * M)
    cu[1:] = lengths.cumsum(0)
    if chunk_size is None:
        chunk_size = min(64, max(16, 1 << (int(lengths.max()) - 1).bit_length()))
    R = kr.shape[1]
    gate_tensors = {}
    for spec in rule.gates:
        shape = (1, R, 1, K) if spec.per_channel else (1, R, 1)
        gate_tensors[spec.name] = torch.full(shape, ideal_gates(rule, **(gates or {}))[spec.name],
                                             dtype=keys.dtype, device=keys.device)
    _, final = rule.forward(kr, kr, vr, impl=impl, chunk_size=chunk_size, cu_seqlens=cu, output_final_state=True,
                            **gate_tensors, **(rule_options or {}))
    memories = rule.memory(final)[:, 0].reshape(B, M, K, V).to(keys.dtype)
    reads_all = torch.einsum("bmkv,bnk->bnmv", memories, keys)  # every key read from every memory of its trial
    reads = reads_all.gather(2, assignment[..., None].expand(B, N, k, V)).mean(2)
    return reads, memories


def recall_metrics(reads: Tensor, values: Tensor) -> dict[str, float]:
    """``error``: mean ``||r_i - v_i||^2 / ||v_i||^2``; ``accuracy``: fraction of reads whose nearest stored
    value (by cosine, among the trial's N values) is their own; ``cosine``: mean ``cos(r_i, v_i)``."""
    err = ((reads - values) ** 2).sum(-1) / (values**2).sum(-1)
    rn = reads / reads.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    vn = _unit(values)
    sims = rn @ vn.transpose(-1, -2)  # [B, N, N]
    hit = sims.argmax(-1) == torch.arange(values.shape[1], device=values.device)
    return {"error": float(err.mean()), "accuracy": float(hit.double().mean()),
            "cosine": float((rn * vn).sum(-1).mean())}


# ----------------------------------------------------------------------------------------- curves
def capacity_curve(rule: str | Rule, sizes: Sequence[int], key_dim: int, value_dim: int | None = None,
                   num_memories: int = 1, router: str | RouterFn = "random", topk: int = 1, keys: str = "gaussian",
                   trials: int = 8, seed: int = 0, gates: dict[str, float] | None = None,
                   rule_options: dict[str, Any] | None = None, impl: str = "chunked", num_clusters: int | None = None,
                   spread: float = 1.0, dtype: torch.dtype = torch.float64) -> list[dict]:
    """Recall as the number of stored associations N grows: one record per N with ``error``, ``accuracy``,
    ``cosine``, ``max_load`` (mean over trials of the largest fraction of slots in one memory) and the
    setting (``rule``, ``num_memories``, ``key_dim``, ``value_dim``, ``router``, ``topk``, ``state_size``)."""
    rule = get_rule(rule)
    V = key_dim if value_dim is None else value_dim
    records = []
    for N in sizes:
        s = seed * 1_000_003 + N
        assoc = make_associations(trials, N, key_dim, V, keys, num_clusters or num_memories, spread, s, dtype)
        idx = route(assoc, num_memories, router, topk, s)
        reads, _ = write_and_read(rule, assoc.keys, assoc.values, idx, num_memories, gates, rule_options, impl)
        counts = torch.nn.functional.one_hot(idx, num_memories).sum((1, 2)).double()  # [B, M]
        records.append({
            "rule": rule.name, "N": int(N), "num_memories": num_memories, "key_dim": key_dim, "value_dim": V,
            "router": router if isinstance(router, str) else getattr(router, "__name__", "custom"), "topk": topk,
            "keys": keys, "state_size": num_memories * key_dim * V,
            "max_load": float((counts.amax(1) / counts.sum(1)).mean()),
            **recall_metrics(reads, assoc.values),
        })
    return records


SETUPS = ("single", "mixture", "expanded")


def compare_capacity(rule: str | Rule, sizes: Sequence[int], dim: int, num_memories: int,
                     router: str | RouterFn = "random", topk: int = 1, **kwargs: Any) -> list[dict]:
    """The three memories of the MoM question, on the same associations' distribution, with values of
    dimension ``dim``: ``"single"`` (one ``dim x dim`` memory), ``"mixture"`` (``num_memories`` memories of
    ``dim x dim``, associations routed by ``router``) and ``"expanded"`` (one memory with keys of dimension
    ``num_memories * dim``: the mixture's total state in one matrix). Records of ``capacity_curve`` plus
    ``setup``."""
    out = []
    for setup, M, K, r, k in (("single", 1, dim, "balanced", 1), ("mixture", num_memories, dim, router, topk),
                              ("expanded", 1, num_memories * dim, "balanced", 1)):
        for rec in capacity_curve(rule, sizes, K, dim, num_memories=M, router=r, topk=k, **kwargs):
            out.append({"setup": setup, **rec})
    return out


def capacity_at(records: Sequence[dict], threshold: float = 0.9, metric: str = "accuracy",
                by: Sequence[str] = ("rule", "setup")) -> dict[tuple, int]:
    """The largest N whose ``metric`` is at least ``threshold`` while every smaller N of the curve also
    is (0 if even the smallest fails), per group ``by``."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault(tuple(r.get(b) for b in by), []).append(r)
    out = {}
    for key, recs in groups.items():
        best = 0
        for r in sorted(recs, key=lambda r: r["N"]):
            if not r[metric] >= threshold:
                break
            best = r["N"]
        out[key] = best
    return out


# ----------------------------------------------------------------------------------------- cross-talk
def crosstalk(rule: str | Rule, keys: Tensor, values: Tensor, assignment: Tensor | None = None,
              num_memories: int | None = None, **kwargs: Any) -> Tensor:
    """``[B, N, N]``: ``X[b, i, j] = ||r_i - r_i^{(-j)}|| / ||v_i||``, how much writing association j changes
    the read of association i (``r^{(-j)}``: the same writes with association j's key and value zeroed, its
    gates and position unchanged, so decaying rules still tick). The diagonal is NaN. Pairs in different
    memories are exactly 0 for isolated memories. ``kwargs`` go to ``write_and_read``."""
    B, N, K = keys.shape
    V = values.shape[-1]
    if assignment is None:
        assignment = torch.zeros(B, N, 1, dtype=torch.long, device=keys.device)
    assignment = assignment[..., None] if assignment.dim() == 2 else assignment
    keep = torch.ones(N + 1, N, dtype=keys.dtype, device=keys.device)
    keep[torch.arange(1, N + 1), torch.arange(N)] = 0.0  # variant 0: all; variant j + 1: without j
    kv = keys[:, None] * keep[None, :, :, None]
    vv = values[:, None] * keep[None, :, :, None]
    av = assignment[:, None].expand(B, N + 1, *assignment.shape[1:])
    M = int(assignment.max()) + 1 if num_memories is None else num_memories
    reads, _ = write_and_read(rule, kv.reshape(B * (N + 1), N, K), vv.reshape(B * (N + 1), N, V),
                              av.reshape(B * (N + 1), N, -1), M, **kwargs)
    reads = reads.view(B, N + 1, N, V)
    delta = (reads[:, :1] - reads[:, 1:]).norm(dim=-1)  # [B, j, i]
    X = delta.transpose(1, 2) / values.norm(dim=-1)[..., None]
    return X.masked_fill(torch.eye(N, dtype=torch.bool, device=keys.device), math.nan)


def crosstalk_summary(X: Tensor, assignment: Tensor | None = None) -> dict[str, float]:
    """Mean and max of the cross-talk matrix over pairs that share a memory (``within``) and pairs that
    share none (``across``; NaN when every pair shares one), their numbers of pairs, and ``per_read``: the
    mean over reads i of ``sum_j X[i, j]``, the disturbance one read collects from all other writes."""
    B, N, _ = X.shape
    if assignment is None:
        assignment = torch.zeros(B, N, 1, dtype=torch.long, device=X.device)
    assignment = assignment[..., None] if assignment.dim() == 2 else assignment
    M = int(assignment.max()) + 1
    sets = torch.nn.functional.one_hot(assignment, M).sum(2).double()  # [B, N, M]
    shared = (sets @ sets.transpose(1, 2)) > 0
    off = ~torch.eye(N, dtype=torch.bool, device=X.device)
    out = {}
    for name, sel in (("within", shared & off), ("across", ~shared & off)):
        vals = X[sel]
        out[f"{name}_mean"] = float(vals.mean()) if vals.numel() else math.nan
        out[f"{name}_max"] = float(vals.max()) if vals.numel() else math.nan
        out[f"{name}_pairs"] = int(vals.numel())
    out["per_read"] = float(X.nan_to_num(0.0).sum(-1).mean())
    return out
