"""Metrics on supervised positions, checked against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from momkit.tasks import SupervisedMetrics, masked_accuracy, masked_cross_entropy, perplexity


def _hand_logits():
    # N=1, T=3, V=4; position 1 is unsupervised and carries extreme logits that must not matter
    logits = torch.tensor([[[0.0, 1.0, 3.0, 0.0], [1e4, -1e4, 0.0, 0.0], [0.0, 2.0, 0.0, 4.0]]])
    labels = torch.tensor([[2, -100, 1]])
    return logits, labels


def _ce(row, label):
    return math.log(sum(math.exp(x) for x in row)) - row[label]


def test_loss_and_accuracy_by_hand():
    logits, labels = _hand_logits()
    want = (_ce([0, 1, 3, 0], 2) + _ce([0, 2, 0, 4], 1)) / 2
    assert masked_cross_entropy(logits, labels).item() == pytest.approx(want, rel=1e-6)
    assert masked_cross_entropy(logits, labels, reduction="sum").item() == pytest.approx(2 * want, rel=1e-6)
    assert masked_accuracy(logits, labels).item() == 0.5  # position 0 right (argmax 2), position 2 wrong (argmax 3)
    assert perplexity(logits, labels).item() == pytest.approx(math.exp(want), rel=1e-6)


def test_bfloat16_logits_are_scored_in_float32():
    logits, labels = _hand_logits()
    got = masked_cross_entropy(logits.bfloat16(), labels)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(masked_cross_entropy(logits, labels).item(), rel=1e-2)


@pytest.mark.parametrize("V", [2, 16, 257])
def test_uniform_model_perplexity_is_vocab_size(V):
    labels = torch.randint(0, V, (3, 7))
    labels[0, :3] = -100
    assert perplexity(torch.zeros(3, 7, V), labels).item() == pytest.approx(V, rel=1e-5)


def test_loss_gradient_only_from_supervised_positions():
    logits, labels = _hand_logits()
    logits.requires_grad_(True)
    masked_cross_entropy(logits, labels).backward()
    assert (logits.grad[0, 1] == 0).all() and logits.grad[0, 0].abs().sum() > 0


def test_no_supervised_position_gives_nan_and_bad_shapes_raise():
    logits = torch.zeros(2, 3, 5)
    labels = torch.full((2, 3), -100)
    assert math.isnan(masked_cross_entropy(logits, labels).item())
    assert math.isnan(masked_accuracy(logits, labels).item())
    with pytest.raises(ValueError, match=r"logits must be \[N, T, V\] and labels \[N, T\].*\[2, 3, 5\].*\[2, 4\]"):
        masked_accuracy(logits, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum'"):
        masked_cross_entropy(logits, labels, reduction="none")


def test_accumulator_weights_every_supervised_token_equally():
    torch.manual_seed(0)
    a_logits, a_labels = torch.randn(4, 8, 6), torch.randint(0, 6, (4, 8))
    b_logits, b_labels = torch.randn(2, 16, 6), torch.randint(0, 6, (2, 16))
    b_labels[:, ::2] = -100
    m = SupervisedMetrics()
    m.update(a_logits, a_labels)
    m.update(b_logits, b_labels)
    got = m.compute()
    flat_logits = torch.cat([a_logits.reshape(1, -1, 6), b_logits.reshape(1, -1, 6)], dim=1)
    flat_labels = torch.cat([a_labels.reshape(1, -1), b_labels.reshape(1, -1)], dim=1)
    assert got["num_supervised"] == 32 + 16
    assert got["loss"] == pytest.approx(masked_cross_entropy(flat_logits, flat_labels).item(), rel=1e-5)
    assert got["accuracy"] == pytest.approx(masked_accuracy(flat_logits, flat_labels).item())
    assert got["perplexity"] == pytest.approx(math.exp(got["loss"]))
    m.reset()
    assert math.isnan(m.compute()["loss"]) and m.compute()["num_supervised"] == 0
