"""Metrics on supervised positions: cross-entropy, accuracy, perplexity, and a running accumulator.

``logits``: ``[N, T, V]`` float (any float dtype; computed in float32); ``labels``: ``[N, T]`` int64 with
``IGNORE_INDEX`` (-100) where there is no supervision. Only positions with ``labels != -100`` count. The
functions return 0-d tensors (no host sync, so they can sit in a training step); with no supervised position
they return NaN (0 / 0), as ``torch.nn.functional.cross_entropy`` does.

For evaluation over many batches (and segments of different lengths), use ``SupervisedMetrics``: it sums
cross-entropy and correct predictions over positions, so its averages weight every supervised token equally.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from momkit.tasks.base import IGNORE_INDEX


def _check(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"logits must be [N, T, V] and labels [N, T] with the same N and T, got logits {list(logits.shape)} "
            f"and labels {list(labels.shape)}"
        )


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over supervised positions: their mean (``reduction="mean"``, the training loss) or sum."""
    _check(logits, labels)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    return F.cross_entropy(
        logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction=reduction
    )


def masked_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Fraction of supervised positions where the arg-max of ``logits`` equals the label."""
    _check(logits, labels)
    mask = labels != IGNORE_INDEX
    correct = (logits.argmax(dim=-1) == labels) & mask
    return correct.sum() / mask.sum()


def perplexity(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``exp`` of the mean cross-entropy over supervised positions (per token; per byte for the text task)."""
    return masked_cross_entropy(logits, labels).exp()


class SupervisedMetrics:
    """Running sums over batches; ``compute()`` gives loss, accuracy, perplexity and the number of positions."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.loss_sum = 0.0
        self.num_correct = 0
        self.num_supervised = 0

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        _check(logits, labels)
        mask = labels != IGNORE_INDEX
        self.loss_sum += masked_cross_entropy(logits, labels, reduction="sum").item()
        self.num_correct += int(((logits.argmax(dim=-1) == labels) & mask).sum())
        self.num_supervised += int(mask.sum())

    def compute(self) -> dict[str, float]:
        n = self.num_supervised
        loss = self.loss_sum / n if n else math.nan
        return {
            "loss": loss,
            "accuracy": self.num_correct / n if n else math.nan,
            "perplexity": (math.exp(loss) if loss < 700 else math.inf) if n else math.nan,
            "num_supervised": n,
        }
