"""Capacity and cross-talk: exact recall where the math says so, isolation of memories, routers."""

from __future__ import annotations

import math

import pytest
import torch

from momkit.analysis import (
    IDEAL_GATES,
    capacity_at,
    capacity_curve,
    compare_capacity,
    crosstalk,
    crosstalk_summary,
    ideal_gates,
    make_associations,
    recall_metrics,
    route,
    token_table_router,
    write_and_read,
)
from momkit.rules import rule_names


def test_every_registered_rule_has_documented_gates():
    assert set(IDEAL_GATES) == set(rule_names())
    for rule in rule_names():
        from momkit.rules import get_rule

        assert set(ideal_gates(rule)) == set(get_rule(rule).gate_names)
    with pytest.raises(ValueError, match="not gates of rule"):
        ideal_gates("deltanet", g=0.0)


@pytest.mark.parametrize("rule", ["linear_attn", "deltanet"])
def test_orthonormal_keys_are_recalled_exactly_up_to_the_key_dimension(rule):
    K = 16
    records = capacity_curve(rule, [4, 8, 16, 24, 32, 64], K, keys="orthonormal", trials=4)
    err = {r["N"]: r["error"] for r in records}
    for N in (4, 8, 16):
        assert err[N] < 1e-24, (N, err[N])
        assert next(r for r in records if r["N"] == N)["accuracy"] == 1.0
    assert 1e-3 < err[24] < err[32] < err[64]  # past N = K the keys overlap and recall degrades
    if rule == "linear_attn":  # the error of linear attention has a closed form: sum_j (k_i . k_j)^2 per read
        a = make_associations(2, 24, K, keys="orthonormal", seed=5)
        reads, _ = write_and_read(rule, a.keys, a.values)
        G = a.keys @ a.keys.transpose(1, 2)
        torch.testing.assert_close(reads, G @ a.values)


@pytest.mark.parametrize("rule", rule_names())
def test_chunked_writes_equal_the_token_loop(rule):
    a = make_associations(2, 21, 8, 6, seed=1)
    idx = route(a, 3, "random", topk=2)
    opts = {"mini_batch": 4} if rule in ("titans", "ttt") else {}
    r1, m1 = write_and_read(rule, a.keys, a.values, idx, 3, impl="chunked", chunk_size=8, rule_options=opts)
    r2, m2 = write_and_read(rule, a.keys, a.values, idx, 3, impl="recurrent", rule_options=opts)
    torch.testing.assert_close(r1, r2, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(m1, m2, atol=1e-12, rtol=1e-10)


def test_a_mixture_is_its_memories_written_alone():
    a = make_associations(2, 30, 8, seed=2)
    idx = route(a, 3, "random")
    reads, mems = write_and_read("gated_deltanet", a.keys, a.values, idx, 3)
    for b in range(2):
        for m in range(3):
            sel = idx[b, :, 0] == m
            r_alone, mem_alone = write_and_read("gated_deltanet", a.keys[b : b + 1, sel], a.values[b : b + 1, sel])
            torch.testing.assert_close(reads[b, sel], r_alone[0], atol=1e-13, rtol=1e-12)
            torch.testing.assert_close(mems[b, m], mem_alone[0, 0], atol=1e-13, rtol=1e-12)


def test_assignment_must_name_existing_memories():
    a = make_associations(1, 4, 4)
    with pytest.raises(ValueError, match="outside"):
        write_and_read("linear_attn", a.keys, a.values, torch.tensor([[0, 1, 2, 3]]), num_memories=2)


def test_memory_matrix_is_the_rule_state():
    # titans' state has three slots; queries read slot 0. With eta = alpha = 0 and mini_batch = 1,
    # titans is deltanet with beta = theta (docs/rules.md), so their memories must agree.
    a = make_associations(2, 12, 8, seed=4)
    _, m_titans = write_and_read("titans", a.keys, a.values, rule_options={"mini_batch": 1})
    _, m_delta = write_and_read("deltanet", a.keys, a.values)
    torch.testing.assert_close(m_titans, m_delta, atol=1e-12, rtol=1e-10)


def test_crosstalk_is_zero_across_isolated_memories():
    a = make_associations(3, 24, 8, seed=7)
    idx = route(a, 4, "random")
    for rule in ("linear_attn", "gated_deltanet", "titans"):
        X = crosstalk(rule, a.keys, a.values, idx, 4)
        assert X.shape == (3, 24, 24) and torch.isnan(X.diagonal(dim1=1, dim2=2)).all()
        s = crosstalk_summary(X, idx)
        assert s["across_max"] == 0.0 and s["across_pairs"] > 0
        assert s["within_mean"] > 1e-3
        assert s["within_pairs"] + s["across_pairs"] == 3 * 24 * 23


def test_crosstalk_of_linear_attention_is_the_key_overlap():
    a = make_associations(2, 10, 6, seed=8)
    X = crosstalk("linear_attn", a.keys, a.values)
    G = (a.keys @ a.keys.transpose(1, 2)).abs()  # |k_i . k_j| ||v_j|| / ||v_i||, unit values
    off = ~torch.eye(10, dtype=torch.bool)
    torch.testing.assert_close(X[:, off], G[:, off])
    s = crosstalk_summary(X)
    assert math.isnan(s["across_mean"])
    assert math.isclose(s["per_read"], float((G * off).sum(-1).mean()), rel_tol=1e-12)


def test_routers():
    a = make_associations(4, 40, 8, keys="clustered", num_clusters=4, seed=9)
    bal = route(a, 4, "balanced", topk=2)
    counts = torch.nn.functional.one_hot(bal, 4).sum((1, 2))
    assert torch.all(counts == 20)
    assert torch.equal(route(a, 4, "oracle")[..., 0], a.clusters)
    rnd = route(a, 4, "random", topk=3)
    assert torch.all(rnd.sort(-1).values.diff(dim=-1) > 0)  # distinct memories per association
    lin = route(a, 4, "linear")
    assert torch.equal(lin, route(a, 4, "linear"))  # a fixed map
    table = torch.tensor([0, 1, 2, 3, 0, 1])
    tok = route(a, 4, token_table_router(table, [1, 2]))
    assert set(tok.unique().tolist()) <= {1, 2}
    with pytest.raises(ValueError, match="clustered keys"):
        route(make_associations(1, 4, 4), 2, "oracle")
    with pytest.raises(ValueError, match="router must be"):
        route(a, 4, "nearest")
    with pytest.raises(ValueError, match="topk"):
        route(a, 4, "random", topk=5)


def test_recall_metrics():
    a = make_associations(2, 8, 8, seed=3)
    perfect = recall_metrics(a.values, a.values)
    assert perfect == {"error": 0.0, "accuracy": 1.0, "cosine": pytest.approx(1.0)}
    shuffled = recall_metrics(a.values.roll(1, dims=1), a.values)
    assert shuffled["accuracy"] == 0.0 and shuffled["error"] > 0.5
    scaled = recall_metrics(0.5 * a.values, a.values)  # nearest value by cosine ignores scale
    assert scaled["accuracy"] == 1.0 and scaled["error"] == pytest.approx(0.25)


def test_mixture_interferes_less_than_a_single_memory_of_the_same_dimension():
    def by_block(assoc, num_memories, topk, gen):  # each block of 16 orthonormal keys to a memory of its own
        B, N = assoc.keys.shape[:2]
        return (torch.arange(N) // 16).expand(B, N) % num_memories

    records = compare_capacity("linear_attn", [16, 32, 64], dim=16, num_memories=4, router=by_block, trials=4,
                               keys="orthonormal")
    err = {(r["setup"], r["N"]): r["error"] for r in records}
    for N in (32, 64):
        assert err[("mixture", N)] < 1e-24 < 1e-2 < err[("single", N)]
        assert err[("expanded", N)] < 1e-24
    random = compare_capacity("linear_attn", [32, 64], dim=16, num_memories=4, router="random", trials=4)
    err = {(r["setup"], r["N"]): r["error"] for r in random}
    for N in (32, 64):
        assert err[("mixture", N)] < 0.5 * err[("single", N)]
    cap = capacity_at(records, threshold=0.999)
    assert cap[("linear_attn", "single")] == 16 and cap[("linear_attn", "mixture")] == 64
    sizes = {r["setup"]: r["state_size"] for r in records}
    assert sizes["mixture"] == sizes["expanded"] == 4 * sizes["single"]


def test_capacity_at_stops_at_the_first_failure():
    recs = [{"rule": "r", "setup": "s", "N": n, "accuracy": acc} for n, acc in [(8, 1.0), (16, 0.8), (32, 0.95)]]
    assert capacity_at(recs, 0.9) == {("r", "s"): 8}
    assert capacity_at(recs, 0.99, by=("rule",)) == {("r",): 8}
    assert capacity_at([{"rule": "r", "setup": "s", "N": 4, "accuracy": 0.1}]) == {("r", "s"): 0}
