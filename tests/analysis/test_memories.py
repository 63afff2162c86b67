"""Trained-model analysis: memory states, similarity, effective rank, MQAR queries and memory ablation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from momkit import LMConfig, MoMConfig, MoMLayer, MoMLM
from momkit.analysis import (
    ablate_memory,
    ablation_effect,
    effective_rank,
    memory_states,
    model_plans,
    query_report,
    recall_by_memory,
    state_similarity,
    state_table,
    token_routing_table,
)
from momkit.tasks import make_mqar

F64 = torch.float64
D = 16


def layer(router="topk_softmax", M=3, k=2, shared=False, rule="gated_deltanet", **kw):
    torch.manual_seed(0)
    cfg = MoMConfig(hidden_size=D, num_heads=2, head_dim=4, num_memories=M, topk=k, router=router,
                    shared_memory=shared, rule=rule, chunk_size=8, **kw)
    return MoMLayer(cfg).double().eval()


def model(router="topk_softmax", shared=True, layers=2, vocab=32):
    torch.manual_seed(0)
    cfg = LMConfig(vocab_size=vocab, num_layers=layers, hidden_size=D,
                   mom=MoMConfig(hidden_size=None, num_heads=2, num_memories=3, topk=2, shared_memory=shared,
                                 router=router, chunk_size=8))
    return MoMLM(cfg).double().eval()


def test_effective_rank():
    eye = torch.eye(5, dtype=F64)
    assert math.isclose(float(effective_rank(eye)), 5.0, rel_tol=1e-12)
    u, v = torch.randn(6, 1, dtype=F64), torch.randn(1, 4, dtype=F64)
    assert math.isclose(float(effective_rank(u @ v)), 1.0, rel_tol=1e-6)
    assert float(effective_rank(torch.zeros(3, 3, dtype=F64))) == 0.0
    batch = torch.stack([eye[:4, :4], torch.diag(torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=F64))])
    torch.testing.assert_close(effective_rank(batch), torch.tensor([4.0, 2.0], dtype=F64))


def test_state_similarity():
    a = torch.randn(2, 2, 3, 3, dtype=F64)  # [H, K, V]
    b = torch.randn(2, 2, 3, 3, dtype=F64)
    states = torch.stack([torch.stack([a[0], 2 * a[0], b[0], torch.zeros_like(a[0])]),
                          torch.stack([a[1], -a[1], b[1], torch.zeros_like(a[1])])])  # [B=2, M'=4, ...]
    S = state_similarity(states)
    assert S.shape == (4, 4)
    torch.testing.assert_close(S.diagonal()[:3], torch.ones(3, dtype=F64))
    assert math.isclose(float(S[0, 1]), 0.0, abs_tol=1e-12)  # +1 in one sequence, -1 in the other
    assert torch.isnan(S[3]).all()  # an always-empty memory has no similarity
    one = state_similarity(states[:1])
    assert math.isclose(float(one[0, 1]), 1.0)
    table = state_table(states, ["a", "b", "c", "d"])
    assert table[3]["empty_fraction"] == 1.0 and math.isnan(table[3]["effective_rank"])
    assert table[0]["effective_rank"] > 1.0


def test_memory_states_are_the_layer_cache():
    m = model()
    ids = torch.randint(0, 32, (3, 20))
    states = memory_states(m, ids)
    assert len(states) == 2
    assert states[0].shape == (3, 4, 2, 8, 8)  # 3 routed + shared, heads 2, K = V = hidden 16 / 2 heads
    out = m(ids, use_cache=True)
    torch.testing.assert_close(states[1], out.cache[1].states)


def test_ablating_a_memory_changes_only_the_tokens_that_read_it():
    lay = layer(M=3, k=2)
    x = torch.randn(2, 24, D, dtype=F64)
    y, aux = lay(x, use_cache=True)
    sel = (aux.plan.indices == 1).any(-1)  # tokens that read memory 1
    assert sel.any() and (~sel).any()
    with ablate_memory(lay, 1):
        y_abl, aux_abl = lay(x, use_cache=True)
    assert torch.all(aux_abl.cache.states[:, 1] == 0)  # never written
    torch.testing.assert_close(aux_abl.cache.states[:, [0, 2]], aux.cache.states[:, [0, 2]], atol=1e-13, rtol=1e-12)
    torch.testing.assert_close(y_abl[~sel], y[~sel], atol=1e-13, rtol=1e-12)
    assert (y_abl[sel] - y[sel]).abs().amax(-1).min() > 1e-6
    y_again, _ = lay(x)
    assert torch.equal(y_again, y)  # the hook is gone after the block


def test_router_ablation_equals_zeroing_the_memorys_values():
    # two mechanisms, one meaning: a memory written with v = 0 from a zero state reads 0, and the
    # token's other slots keep their weights; the router hook must give the same outputs
    for rule in ("gated_deltanet", "titans", "gla"):
        lay = layer(M=3, k=2, rule=rule)
        x = torch.randn(2, 24, D, dtype=F64)
        with ablate_memory(lay, 2):
            y_hook, _ = lay(x)
        h = lay.memories[2].v_proj.register_forward_hook(lambda mod, args, out: torch.zeros_like(out))
        try:
            y_zero, _ = lay(x)
        finally:
            h.remove()
        torch.testing.assert_close(y_hook, y_zero, atol=1e-13, rtol=1e-12)


def test_ablating_the_shared_memory():
    lay = layer(M=2, k=1, shared=True)
    x = torch.randn(2, 16, D, dtype=F64)
    y, aux = lay(x, use_cache=True)
    with ablate_memory(lay, "shared"):
        y_abl, aux_abl = lay(x, use_cache=True)
    assert torch.all(aux_abl.cache.states[:, 2] == 0)
    torch.testing.assert_close(aux_abl.cache.states[:, :2], aux.cache.states[:, :2])
    assert (y_abl - y).abs().amax(-1).min() > 1e-6  # every token read the shared memory
    with pytest.raises(ValueError, match="no shared memory"), ablate_memory(layer(shared=False), "shared"):
        pass
    with pytest.raises(ValueError, match="memory must be"), ablate_memory(lay, 3):
        pass


@pytest.mark.parametrize("memory", [0, "shared"])
def test_ablation_holds_while_decoding(memory):
    lay = layer(M=3, k=2, shared=True)
    x = torch.randn(2, 10, D, dtype=F64)
    y_before, _ = lay(x)
    with torch.no_grad():
        lay.step(x[:, 0], lay.init_cache(2, dtype=F64))  # stacked decoding weights made before the ablation
    with ablate_memory(lay, memory):
        y_full, _ = lay(x)
        _, aux = lay(x[:, :4], use_cache=True)
        cache, ys = aux.cache, []
        for t in range(4, 10):
            y_t, cache = lay.step(x[:, t], cache)
            ys.append(y_t)
    torch.testing.assert_close(torch.stack(ys, 1), y_full[:, 4:], atol=1e-11, rtol=1e-9)
    assert torch.all(cache.states[:, 0 if memory == 0 else 3] == 0)
    assert (y_full - y_before).abs().max() > 1e-6  # the ablation acts
    torch.testing.assert_close(lay(x)[0], y_before, atol=0, rtol=0)  # restored


def test_ablation_effect_records():
    m = model()
    inputs, labels = make_mqar(16, 24, 32, 4, seed=1)
    recs = ablation_effect(m, inputs, labels)
    expected = [(li, mem) for li in (0, 1) for mem in ("0", "1", "2", "shared")]
    assert [(r["layer"], r["memory"]) for r in recs] == expected
    n_queries = int((labels != -100).sum())
    for r in recs:
        assert r["reading_queries"] + r["other_queries"] == n_queries
        assert math.isclose(r["delta"], r["accuracy"] - r["baseline"])
    loads = [r["load"] for r in recs if r["layer"] == 0 and r["memory"] != "shared"]
    assert math.isclose(sum(loads), 1.0)
    with ablate_memory(m, 1, layer=0):
        acc = (m(inputs).logits.argmax(-1)[labels != -100] == labels[labels != -100]).double().mean()
    assert math.isclose(recs[1]["accuracy"], float(acc))


def test_query_report_points_at_the_queried_pair():
    m = model(shared=False)
    n = 4
    inputs, labels = make_mqar(8, 24, 32, n, seed=2)
    rep = query_report(m, inputs, labels, layer=1)
    assert len(rep["example"]) == 8 * n
    plan = model_plans(m, inputs)[1]
    for q in range(0, 8 * n, 5):
        e, p = int(rep["example"][q]), int(rep["position"][q])
        pair = [int(inputs[e, 2 * i]) for i in range(n)].index(int(inputs[e, p]))
        w = plan.weights[e, p]
        assert rep["memory"][q] == int(plan.indices[e, p, w.argmax()])
        vw = plan.weights[e, 2 * pair + 1]
        assert rep["value_memory"][q] == int(plan.indices[e, 2 * pair + 1, vw.argmax()])
        shared = set(plan.indices[e, p].tolist()) & set(plan.indices[e, 2 * pair + 1].tolist())
        assert bool(rep["same_memory"][q]) == bool(shared)
    table = recall_by_memory(rep, 3)
    assert sum(r["queries"] for r in table) == 8 * n
    assert math.isclose(sum(r["share"] for r in table), 1.0)
    overall = float(np.mean(rep["correct"]))
    weighted = sum(r["accuracy"] * r["queries"] for r in table if r["queries"]) / (8 * n)
    assert math.isclose(overall, weighted)


@pytest.mark.parametrize("router", ["topk_softmax", "hash"])
def test_first_layer_routing_depends_on_the_token_alone(router):
    m = model(router=router)
    table = token_routing_table(m)
    ids = torch.randint(0, 32, (3, 16))
    plan = model_plans(m, ids)[0]
    order = plan.weights.argsort(-1, descending=True)
    torch.testing.assert_close(plan.indices.gather(-1, order), table[ids])
    with pytest.raises(ValueError, match="round_robin"):
        token_routing_table(model(router="round_robin"))
