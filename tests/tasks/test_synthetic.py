"""Selective copying and single-needle recall: layout invariants, seeds, validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from momkit.config import ConfigError
from momkit.tasks import IGNORE_INDEX, NeedleConfig, SelectiveCopyingConfig, make_needle, make_selective_copying


@pytest.mark.parametrize("T,V,M", [(64, 16, 16), (32, 3, 16), (40, 10, 5), (2, 3, 1)])
def test_selective_copying_layout(T, V, M):
    N = 200
    inputs, labels = make_selective_copying(N, T, V, M, seed=1)
    assert inputs.shape == labels.shape == (N, T) and inputs.dtype == labels.dtype == torch.int64
    D = T - M
    assert (inputs[:, D:] == V - 1).all(), "the last num_tokens positions are markers"
    assert (labels[:, :D] == IGNORE_INDEX).all() and (labels[:, D:] != IGNORE_INDEX).all()
    data = inputs[:, :D]
    assert ((data >= 0) & (data < V - 1)).all(), "the data region holds noise (0) and data tokens [1, V-1)"
    for r in range(N):
        nz = data[r][data[r] != 0]
        assert len(nz) == M, "exactly num_tokens data tokens"
        assert torch.equal(nz, labels[r, D:]), "labels are the data tokens in order of position"


def test_selective_copying_positions_vary_and_cover_the_region():
    inputs, _ = make_selective_copying(2000, 48, 8, 8, seed=0)
    present = (inputs[:, :40] != 0).float().mean(dim=0)
    assert (present > 0.1).all(), "every data-region position is used"
    assert len({tuple((r != 0).nonzero().flatten().tolist()) for r in inputs[:50]}) == 50, "positions vary"


def test_selective_copying_seeds():
    a, b, c = (make_selective_copying(32, 64, 16, 8, seed=s) for s in (3, 3, 4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(seq_len=31, num_tokens=16), r"num_tokens=16 does not fit in seq_len=31.* = 32"),
        (dict(vocab_size=2), r"vocab_size must be an integer >= 3, got 2"),
        (dict(num_tokens=0), r"num_tokens must be an integer >= 1, got 0"),
        (dict(num_examples=-3), r"num_examples must be an integer >= 1, got -3"),
    ],
)
def test_selective_copying_validation(kwargs, match):
    args = dict(num_examples=4, seq_len=64, vocab_size=16, num_tokens=16) | kwargs
    with pytest.raises(ConfigError, match=match):
        make_selective_copying(**args)


def test_selective_copying_config():
    data = SelectiveCopyingConfig(seq_len=64, num_tokens=8, num_train_examples=100, num_valid_examples=20).build()
    assert data.vocab_size == 16 and len(data.train[0]) == 100 and len(data.valid[0]) == 20
    assert data.train[0].seq_len == 64 and "selective copying" in data.description
    assert not torch.equal(data.train[0].inputs[:20], data.valid[0].inputs)
    with pytest.raises(ConfigError, match=r"num_train_examples must be an integer >= 1, got 0"):
        SelectiveCopyingConfig(num_train_examples=0)
    with pytest.raises(ConfigError, match=r"num_valid_examples must be an integer >= 1, got 0"):
        SelectiveCopyingConfig(num_valid_examples=0)


@pytest.mark.parametrize("T,V,depth", [(64, 32, None), (3, 4, None), (50, 256, 0.0), (50, 256, 1.0), (51, 16, 0.5)])
def test_needle_layout(T, V, depth):
    N = 500
    inputs, labels = make_needle(N, T, V, depth=depth, seed=2)
    assert inputs.shape == labels.shape == (N, T) and inputs.dtype == labels.dtype == torch.int64
    assert (labels[:, :-1] == IGNORE_INDEX).all()
    key, value = inputs[:, -1], labels[:, -1]
    assert ((key >= 1) & (key < V // 2)).all() and ((value >= V // 2) & (value < V)).all()
    assert ((inputs >= 0) & (inputs < V)).all()
    is_key = inputs[:, :-1] == key[:, None]
    assert (is_key.sum(dim=1) == 1).all(), "the key occurs exactly once before the query"
    pos = is_key.int().argmax(dim=1)
    assert torch.equal(inputs[torch.arange(N), pos + 1], value), "the value follows the needle key"
    assert (pos <= T - 3).all()
    if depth is not None:
        assert (pos == round(depth * (T - 3))).all()
    elif T > 10:
        assert pos.unique().numel() > (T - 2) // 2, "needle positions spread over the sequence"


def test_needle_seeds_and_config():
    a, b, c = (make_needle(32, 64, 64, seed=s) for s in (0, 0, 1))
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    data = NeedleConfig(seq_len=32, vocab_size=64, num_train_examples=50, num_valid_examples=10, depth=0.25).build()
    assert data.vocab_size == 64 and data.train[0].info == {"seq_len": 32, "depth": 0.25}
    assert ((data.valid[0].labels != IGNORE_INDEX).sum(dim=1) == 1).all()
    assert "needle" in data.description


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(seq_len=2), r"seq_len must be an integer >= 3, got 2"),
        (dict(vocab_size=3), r"vocab_size must be an integer >= 4, got 3"),
        (dict(depth=1.5), r"depth must be None \(uniform\) or a number in \[0, 1\], got 1.5"),
        (dict(depth="deep"), r"depth must be a number, got 'deep'"),
    ],
)
def test_needle_validation(kwargs, match):
    args = dict(num_examples=4, seq_len=16, vocab_size=16) | kwargs
    with pytest.raises(ConfigError, match=match):
        make_needle(**args)
    cfg_args = {k: v for k, v in kwargs.items()}
    with pytest.raises(ConfigError, match=match):
        NeedleConfig(**cfg_args)


def test_needle_haystack_is_uniform_without_the_key():
    inputs, _ = make_needle(4000, 40, 8, depth=0.0, seed=0)
    hay = inputs[:, 2:-1]
    key = inputs[:, -1:]
    counts = np.bincount(hay.flatten().numpy(), minlength=8) / hay.numel()
    key_share = np.bincount(key.flatten().numpy(), minlength=8) / len(key)
    # a token's haystack share is (1 - P(it is the key)) / 7
    assert np.abs(counts - (1 - key_share) / 7).max() < 0.005
