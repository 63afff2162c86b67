"""MQAR: layout invariants, the power-law query placement against exact successive sampling, seeds, validation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from momkit.config import ConfigError
from momkit.tasks import IGNORE_INDEX, MQARConfig, MQARSegment, make_mqar, sample_distinct, split_seeds


def _block(inputs, n, passes=1):
    C = 2 * n * passes
    return inputs[:, 0:C:2], inputs[:, 1:C:2], C


@pytest.mark.parametrize(
    "n,T,V,passes",
    [(4, 64, 64, 1), (8, 40, 20, 1), (3, 30, 8192, 2), (1, 4, 4, 1), (16, 64, 34, 1), (5, 31, 12, 1), (2, 13, 6, 2)],
)
@pytest.mark.parametrize("random_non_queries", [True, False])
def test_layout_invariants(n, T, V, passes, random_non_queries):
    N = 300
    inputs, labels = make_mqar(N, T, V, n, num_passes=passes, random_non_queries=random_non_queries, seed=3)
    assert inputs.shape == labels.shape == (N, T) and inputs.dtype == labels.dtype == torch.int64
    keys, values, C = _block(inputs, n, passes)
    # the block: keys in [1, V/2) and values in [V/2, V), each without replacement; repeated num_passes times
    assert ((keys >= 1) & (keys < V // 2)).all() and ((values >= V // 2) & (values < V)).all()
    assert (keys[:, :n].sort(dim=1).values.diff(dim=1) > 0).all()
    assert (values[:, :n].sort(dim=1).values.diff(dim=1) > 0).all()
    for p in range(1, passes):
        assert torch.equal(inputs[:, : 2 * n], inputs[:, 2 * n * p : 2 * n * (p + 1)])
    assert (labels[:, :C] == IGNORE_INDEX).all()
    sup = labels != IGNORE_INDEX
    assert (sup.sum(dim=1) == n).all(), "exactly one supervised position per key-value pair"
    for r in range(N):
        pos = sup[r].nonzero().flatten()
        assert ((pos - C) % 2 == 0).all(), "queries sit at even offsets of the query region"
        pair = {int(k): int(v) for k, v in zip(keys[r, :n], values[r, :n])}
        queried = [int(inputs[r, t]) for t in pos]
        assert sorted(queried) == sorted(pair), "every key is queried exactly once"
        for t in pos:
            assert int(labels[r, t]) == pair[int(inputs[r, t])], "the label is the value paired with the query key"
    if (T - C) % 2:  # an odd query region: its last position is filler, never a query
        assert (labels[:, -1] == IGNORE_INDEX).all()
    region = inputs[:, C:]
    if random_non_queries:
        assert ((region >= 0) & (region < V)).all()
        if V >= 8:
            assert (region[~sup[:, C:]] != 0).float().mean() > 0.5, "fillers are random tokens"
    else:
        assert torch.equal(region != 0, sup[:, C:]), "without random fillers only the queries are non-zero"


def test_zoology_docstring_shape():
    # zoology's example: vocab 12, 2 pairs, length 16, no random fillers -> k v k v, then queries at even offsets
    inputs, labels = make_mqar(50, 16, 12, 2, random_non_queries=False, seed=0)
    keys, values, C = _block(inputs, 2)
    assert C == 4
    assert ((keys >= 1) & (keys < 6)).all() and ((values >= 6) & (values < 12)).all()
    assert (inputs[:, C + 1 :: 2] == 0).all(), "the value is never written after its query"
    assert torch.equal(labels != IGNORE_INDEX, (inputs != 0) & (torch.arange(16) >= C)), "labels sit at the queries"


def _successive_marginals(p, n):
    """Exact P(pair i takes slot j) when n slots are drawn without replacement by weights p (pair i = i-th draw)."""
    S = len(p)
    out = np.zeros((n, S))
    for seq in itertools.permutations(range(S), n):
        prob, left = 1.0, 1.0
        for s in seq:
            prob *= p[s] / left
            left -= p[s]
        for i, s in enumerate(seq):
            out[i, s] += prob
    return out


@pytest.mark.parametrize("power_a", [0.01, 0.5, 1.0])
def test_query_slots_follow_zoology_power_law(power_a):
    n, S, N = 3, 6, 40_000
    C = 2 * n
    T = C + 2 * S
    p = power_a * np.arange(1, S + 1) ** (power_a - 1)
    p = p / p.sum()
    want = _successive_marginals(p, n)
    inputs, _ = make_mqar(N, T, 64, n, power_a=power_a, random_non_queries=False, seed=11)
    keys = inputs[:, 0:C:2].numpy()
    got = np.zeros((n, S))
    for i in range(n):
        # slot of pair i: where its key appears in the query region
        hit = inputs[:, C::2].numpy() == keys[:, i : i + 1]
        assert (hit.sum(axis=1) == 1).all()
        got[i] = np.bincount(hit.argmax(axis=1), minlength=S) / N
    assert np.abs(got - want).max() < 0.015, f"empirical\n{got}\nexact\n{want}"


def test_deterministic_by_seed_and_seeds_differ():
    a = make_mqar(64, 64, 128, 4, seed=5)
    b = make_mqar(64, 64, 128, 4, seed=5)
    c = make_mqar(64, 64, 128, 4, seed=6)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert not torch.equal(a[1], c[1])


def test_does_not_touch_global_rng():
    np.random.seed(1)
    torch.manual_seed(1)
    np_state, torch_state = np.random.get_state()[1].copy(), torch.get_rng_state().clone()
    make_mqar(16, 32, 64, 4, seed=0)
    assert (np.random.get_state()[1] == np_state).all() and torch.equal(torch.get_rng_state(), torch_state)


def test_split_seeds_disjoint():
    train, valid = split_seeds(0, 5, 7)
    assert len(set(train)) == 5 and len(set(valid)) == 7
    assert all(0 <= s < 2**31 for s in train) and all(2**31 <= s < 2**32 for s in valid)
    assert split_seeds(0, 5, 7) == (train, valid) and split_seeds(1, 5, 7) != (train, valid)


def test_config_build_segments_and_disjoint_splits():
    cfg = MQARConfig(
        vocab_size=256,
        train=[MQARSegment(200, 32, 4), MQARSegment(100, 64, 8)],
        valid=[MQARSegment(50, 32, 4), MQARSegment(50, 128, 16)],
        seed=2,
    )
    data = cfg.build()
    assert data.vocab_size == 256 and data.name == "mqar" and "MQAR" in data.description
    assert [(len(s), s.seq_len, s.info["num_kv_pairs"]) for s in data.train] == [(200, 32, 4), (100, 64, 8)]
    assert [s.name for s in data.valid] == ["seq_len=32,num_kv_pairs=4", "seq_len=128,num_kv_pairs=16"]
    for s in data.train + data.valid:
        assert ((s.labels != IGNORE_INDEX).sum(dim=1) == s.info["num_kv_pairs"]).all()
    train_rows = {tuple(r) for r in data.train[0].inputs.tolist()}
    assert not train_rows & {tuple(r) for r in data.valid[0].inputs.tolist()}, "train and valid share examples"
    again = cfg.build()
    assert all(torch.equal(a.inputs, b.inputs) for a, b in zip(data.train + data.valid, again.train + again.valid))


def test_zoology_preset():
    cfg = MQARConfig.zoology(seed=1)
    assert cfg.vocab_size == 8192 and cfg.seed == 1
    assert [(s.seq_len, s.num_kv_pairs) for s in cfg.train][-1] == (256, 64)
    assert [(s.seq_len, s.num_kv_pairs) for s in cfg.valid][-1] == (1024, 256)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_kv_pairs=40), r"num_kv_pairs=40 does not fit in seq_len=64 .* >= .* = 160"),
        (dict(seq_len=15), r"num_kv_pairs=4 does not fit in seq_len=15 .* = 16"),
        (dict(num_passes=8), r"num_kv_pairs=4 does not fit in seq_len=64 with num_passes=8"),
        (dict(vocab_size=9), r"vocab_size=9 is too small for num_kv_pairs=4.* >= 2\*num_kv_pairs\+2 = 10"),
        (dict(power_a=0.0), r"power_a must be a number > 0, got 0.0"),
        (dict(power_a=-1.0), r"power_a must be a number > 0, got -1.0"),
        (dict(power_a=float("nan")), r"power_a must be a finite number, got nan"),
        (dict(num_examples=0), r"num_examples must be an integer >= 1, got 0"),
        (dict(num_kv_pairs=0), r"num_kv_pairs must be an integer >= 1, got 0"),
        (dict(num_kv_pairs=2.0), r"num_kv_pairs must be an integer, got 2.0"),
        (dict(num_passes=0), r"num_passes must be an integer >= 1, got 0"),
        (dict(seq_len=True), r"seq_len must be an integer, got True"),
        (dict(random_non_queries="yes"), r"random_non_queries must be true or false, got 'yes'"),
        (dict(seed=-1), r"seed must be an integer >= 0, got -1"),
    ],
)
def test_make_mqar_validation(kwargs, match):
    args = dict(num_examples=4, seq_len=64, vocab_size=64, num_kv_pairs=4) | kwargs
    with pytest.raises(ConfigError, match=match):
        make_mqar(**args)


def test_smallest_valid_arguments_pass():
    make_mqar(2, 16, 10, 4)  # seq_len = 2*4*2 and vocab_size = 2*4+2 exactly
    make_mqar(2, 17, 11, 4, power_a=1e-6)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(train=[MQARSegment(10, 8, 4)]), r"train\[0\].num_kv_pairs=4 does not fit in train\[0\].seq_len=8"),
        (dict(valid=[MQARSegment(10, 64, 4), MQARSegment(0, 64, 4)]), r"valid\[1\].num_examples must be .* got 0"),
        (
            dict(train=[{"num_examples": 10, "seq_len": 64, "num_kv_pair": 4}]),
            r"unknown key train\[0\].num_kv_pair .*did you mean train\[0\].num_kv_pairs\?",
        ),
        (dict(train=[]), r"train must be a non-empty list of segments"),
        (dict(valid="64"), r"valid must be a non-empty list"),
        (dict(train=[5]), r"train\[0\] must be a segment mapping"),
        (dict(vocab_size=8), r"vocab_size=8 is too small for train\[0\].num_kv_pairs=4"),
        (dict(power_a=0), r"power_a must be a number > 0, got 0"),
        (dict(name="mqa"), r"name of a MQARConfig must be 'mqar', got 'mqa'"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        MQARConfig(**kwargs)


def test_config_validate_catches_later_edits():
    cfg = MQARConfig()
    cfg.train[0].num_kv_pairs = 1000
    with pytest.raises(ConfigError, match=r"train\[0\].num_kv_pairs=1000"):
        cfg.build()


@pytest.mark.parametrize("rows,population,size", [(4000, 50, 3), (4000, 20, 3), (4000, 12, 12), (300, 5000, 100)])
def test_sample_distinct_uniform_and_distinct(rows, population, size):
    out = sample_distinct(np.random.default_rng(0), rows, population, size)
    assert out.shape == (rows, size) and out.min() >= 0 and out.max() < population
    assert (np.diff(np.sort(out, axis=1), axis=1) > 0).all()
    if population <= 50:  # every value equally likely in every slot (checks order uniformity too)
        for col in (0, size - 1):
            freq = np.bincount(out[:, col], minlength=population) / rows
            assert np.abs(freq - 1 / population).max() < 5 * np.sqrt(1 / population / rows)


def test_random_fillers_change_only_the_fillers():
    plain = make_mqar(64, 48, 256, 6, random_non_queries=False, seed=9)
    noisy = make_mqar(64, 48, 256, 6, random_non_queries=True, seed=9)
    keep = plain[0] != 0
    assert torch.equal(plain[1], noisy[1]) and torch.equal(plain[0][keep], noisy[0][keep])
