"""Routing analysis: heatmap data, load, entropy, co-selection, MQAR roles and role tables."""

from __future__ import annotations

import math

import pytest
import torch

from momkit import LMConfig, MoMConfig, MoMLayer, MoMLM
from momkit.analysis import (
    FILLER,
    KEY,
    QUERY,
    VALUE,
    assignment,
    coselection,
    heatmap,
    load,
    model_plans,
    mqar_roles,
    mutual_information,
    role_assignment,
    router_entropy,
)
from momkit.routing import RoutingPlan, RoutingStats
from momkit.tasks import make_mqar

F64 = torch.float64
D = 16


def layer(router="topk_softmax", M=4, k=2, **kw):
    torch.manual_seed(0)
    cfg = MoMConfig(hidden_size=D, num_heads=2, head_dim=4, num_memories=M, topk=M if router == "dense" else k,
                    router=router, shared_memory=False, chunk_size=8, **kw)
    return MoMLayer(cfg).double().eval()


@pytest.mark.parametrize("capacity", [None, 0.5])
def test_heatmap_data_holds_exactly_the_routing_weights(capacity):
    lay = layer(capacity_factor=capacity)
    x = torch.randn(3, 24, D, dtype=F64)
    mask = torch.ones(3, 24, dtype=torch.bool)
    mask[2, :5] = False
    plan = lay.route(x, attention_mask=mask)
    A = assignment(plan)
    w = plan.weights * plan.kept
    torch.testing.assert_close(A.sum(-1), w.sum(-1))
    for b, t, j in [(0, 0, 0), (1, 7, 1), (2, 23, 0), (0, 11, 1)]:
        assert A[b, t, plan.indices[b, t, j]] == w[b, t, j]
    assert torch.all(A[2, :5] == 0)  # padding is routed nowhere
    real = plan.kept.any(-1)
    torch.testing.assert_close(A.sum(-1)[real], torch.ones_like(A.sum(-1)[real]))  # renormalised after drops
    if capacity is not None:
        assert int((~plan.kept & mask[..., None]).sum()) > 0
    H = heatmap(plan, example=1)
    assert H.shape == (24, 4) and torch.equal(H, A[1])
    counts = assignment(plan, weighted=False)
    assert set(counts.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(counts.sum(-1), plan.kept.sum(-1).to(counts.dtype))


def test_load_and_entropy_agree_with_the_layer_telemetry():
    lay = layer()
    x = torch.randn(2, 30, D, dtype=F64)
    plan = lay.route(x)
    stats = RoutingStats.from_plan(plan, torch.ones(2, 30, dtype=torch.bool))
    torch.testing.assert_close(load(plan), torch.tensor(stats.load, dtype=F64))
    ent = router_entropy(plan)
    assert ent.shape == (2, 30)
    assert math.isclose(float(ent.mean()), stats.entropy, rel_tol=1e-12)
    norm = router_entropy(plan, normalized=True)
    torch.testing.assert_close(norm, ent / math.log(4))
    assert bool(((norm >= 0) & (norm <= 1)).all())
    assert torch.isnan(router_entropy(layer("round_robin").route(x))).all()


def test_coselection_counts_pairs_of_memories():
    lay = layer(M=4, k=2)
    x = torch.randn(2, 20, D, dtype=F64)
    plan = lay.route(x)
    C = coselection(plan, normalize=False)
    brute = torch.zeros(4, 4, dtype=F64)
    for b in range(2):
        for t in range(20):
            sel = plan.indices[b, t].tolist()
            for a in sel:
                for c in sel:
                    brute[a, c] += 1
    torch.testing.assert_close(C, brute)
    Cn = coselection(plan)
    assert math.isclose(float(Cn.diagonal().sum()), 2.0)  # every token selects two memories
    torch.testing.assert_close(Cn, Cn.T)
    top1 = coselection(layer(M=4, k=1).route(x))
    assert torch.all(top1 - torch.diag(top1.diagonal()) == 0)
    assert math.isclose(float(top1.diagonal().sum()), 1.0)


@pytest.mark.parametrize("passes", [1, 2])
def test_mqar_roles_follow_the_layout(passes):
    n, T, V = 4, 40, 64
    inputs, labels = make_mqar(50, T, V, n, num_passes=passes, seed=3)
    roles = mqar_roles(inputs, labels, num_passes=passes)
    C = 2 * n * passes
    assert torch.all((roles == KEY).sum(1) == n * passes)
    assert torch.all((roles == VALUE).sum(1) == n * passes)
    assert torch.all((roles == QUERY).sum(1) == n)
    assert torch.all((roles == FILLER).sum(1) == T - C - n)
    keys, values = inputs[roles == KEY], inputs[roles == VALUE]
    assert bool(((keys >= 1) & (keys < V // 2)).all()) and bool((values >= V // 2).all())
    # every query token is one of its example's keys, and its label the value that followed that key
    for e in range(5):
        kv = {int(inputs[e, 2 * i]): int(inputs[e, 2 * i + 1]) for i in range(n)}
        for p in (roles[e] == QUERY).nonzero().flatten().tolist():
            assert kv[int(inputs[e, p])] == int(labels[e, p])


def test_mqar_roles_refuse_inconsistent_inputs():
    inputs, labels = make_mqar(4, 32, 64, 4, seed=0)
    with pytest.raises(ValueError, match="inside the key-value block"):
        mqar_roles(inputs, labels, num_kv_pairs=8)
    bad = labels.clone()
    bad[0, (bad[0] != -100).nonzero()[0]] = -100
    with pytest.raises(ValueError, match="same number of supervised"):
        mqar_roles(inputs, bad)


def _plan(indices, M):
    idx = torch.as_tensor(indices)[None, :, None]
    return RoutingPlan(idx, torch.ones(idx.shape, dtype=F64), torch.ones(idx.shape, dtype=torch.bool), M)


def test_role_table_and_mutual_information():
    roles = torch.tensor([[KEY, VALUE, QUERY, FILLER] * 5])
    perfect = _plan(roles[0].tolist(), 4)  # each role has a memory of its own
    table = role_assignment(perfect, roles)
    torch.testing.assert_close(table, torch.eye(4, dtype=F64))
    assert math.isclose(mutual_information(role_assignment(perfect, roles, normalize=False)), math.log(4))
    roles = roles[:, :16]
    blind = _plan([(t // 4) % 2 for t in range(16)], 2)  # blocks of 4 alternate: the role says nothing
    table = role_assignment(blind, roles)
    torch.testing.assert_close(table, torch.full((4, 2), 0.5, dtype=F64))
    assert abs(mutual_information(role_assignment(blind, roles, normalize=False))) < 1e-12
    absent = role_assignment(_plan([0] * 4, 2), torch.tensor([[KEY, KEY, VALUE, VALUE]]))
    assert torch.isnan(absent[QUERY]).all() and absent[KEY, 0] == 1


def test_model_plans_per_block():
    torch.manual_seed(0)
    cfg = LMConfig(vocab_size=32, num_layers=3, hidden_size=16, attention_every=3,
                   mom=MoMConfig(hidden_size=None, num_heads=2, num_memories=3, topk=2, chunk_size=8))
    model = MoMLM(cfg).train()
    ids = torch.randint(0, 32, (2, 12))
    plans = model_plans(model, ids)
    assert [p is None for p in plans] == [False, False, True]
    assert plans[0].indices.shape == (2, 12, 2)
    assert model.training  # restored
    out = model.eval()(ids)
    assert torch.equal(out.aux[1].plan.indices, plans[1].indices)
