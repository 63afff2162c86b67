"""What every task builds: segments of ``(inputs, labels)``, a ``TaskData`` holding them, and batching.

Convention shared by all tasks: ``inputs`` and ``labels`` are int64 tensors ``[N, T]``; ``labels[n, t]`` is the
token the model must emit *at* position ``t`` (the next-token shift is already applied), and ``IGNORE_INDEX``
(-100) marks positions without supervision. A model's ``logits[n, t]`` are scored against ``labels[n, t]``.

A split is a list of ``Segment``s. Every segment has one sequence length; a split may mix lengths (MQAR mixtures
as in zoology). Segments are never padded to a common length: a batch always comes from one segment, so a causal
model, its routing statistics and its auxiliary losses only ever see real tokens. ``TaskData.batches`` yields
``Batch(inputs, labels, segment)`` and is deterministic given ``(seed, epoch)``, so a training loop can resume
from a batch index with ``start``.

Seeds: ``split_seeds(seed, n_train, n_valid)`` derives one seed per segment, train seeds in ``[0, 2**31)`` and
valid seeds in ``[2**31, 2**32)`` as in zoology, so train and valid data never come from the same seed.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from momkit.config import ConfigError

IGNORE_INDEX = -100
_SEED_HALF = 2**31
SPLITS = ("train", "valid")


class Batch(NamedTuple):
    """One batch: ``inputs`` and ``labels`` ``[B, T]`` int64, and the index of the segment it came from."""

    inputs: torch.Tensor
    labels: torch.Tensor
    segment: int


@dataclass
class Segment:
    """Examples sharing one sequence length: ``inputs``, ``labels`` ``[N, T]`` int64; ``info`` describes them
    (e.g. ``{"seq_len": 64, "num_kv_pairs": 4}``) and names the slice in per-segment metrics."""

    inputs: torch.Tensor
    labels: torch.Tensor
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        for key, x in (("inputs", self.inputs), ("labels", self.labels)):
            if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype != torch.int64:
                got = f"{x.dtype} tensor of shape {list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"Segment.{key} must be a 2-D int64 tensor [N, T], got {got}")
        if self.inputs.shape != self.labels.shape:
            raise ValueError(
                f"Segment.labels must have the shape of inputs {list(self.inputs.shape)}, got {list(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return self.inputs.shape[0]

    @property
    def seq_len(self) -> int:
        return self.inputs.shape[1]

    @property
    def name(self) -> str:
        """A short label for metrics, e.g. ``seq_len=64,num_kv_pairs=4``."""
        return ",".join(f"{k}={v}" for k, v in self.info.items()) or f"seq_len={self.seq_len}"


@dataclass
class TaskData:
    """What a task config's ``build()`` returns: the train and valid splits, the vocabulary size, a description."""

    name: str
    vocab_size: int
    description: str
    train: list[Segment]
    valid: list[Segment]

    def split(self, split: str) -> list[Segment]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return self.train if split == "train" else self.valid

    def tensors(self, split: str, seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """All of a split as one ``(inputs, labels)`` pair, or with ``seq_len`` its segments of that length;
        without it, only when the split's segments share one sequence length."""
        segments = self.split(split)
        lengths = sorted({s.seq_len for s in segments})
        if seq_len is not None:
            if seq_len not in lengths:
                raise ValueError(f"seq_len={seq_len!r} is invalid: the {split} split has sequence lengths {lengths}")
            segments = [s for s in segments if s.seq_len == seq_len]
        elif len(lengths) != 1:
            raise ValueError(
                f"the {split} split mixes sequence lengths {lengths}; pass seq_len= for one of them, or use "
                "TaskData.batches, which keeps each length in its own batches"
            )
        return torch.cat([s.inputs for s in segments]), torch.cat([s.labels for s in segments])

    def num_examples(self, split: str) -> int:
        return sum(len(s) for s in self.split(split))

    def num_batches(self, split: str, batch_size: int, drop_last: bool = False) -> int:
        _check_int("batch_size", batch_size, minimum=1)
        rnd = math.floor if drop_last else math.ceil
        return sum(rnd(len(s) / batch_size) for s in self.split(split))

    def batches(
        self,
        split: str,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        start: int = 0,
        drop_last: bool = False,
    ) -> Iterator[Batch]:
        """Batches of one segment each, ``num_batches(split, batch_size, drop_last)`` of them.

        ``shuffle=False``: segments in order, examples in order (zoology's order; use it for evaluation).
        ``shuffle=True``: examples permuted within each segment and batches of all segments interleaved, by a
        generator seeded with ``(seed, epoch)`` only, so the order is reproducible. ``start`` skips that many
        batches of this order (resuming mid-epoch) without touching the skipped data.
        """
        _check_int("batch_size", batch_size, minimum=1)
        _check_int("start", start, minimum=0)
        segments = self.split(split)
        rng = np.random.default_rng([seed, epoch]) if shuffle else None
        orders, plan = [], []
        for i, seg in enumerate(segments):
            orders.append(rng.permutation(len(seg)) if shuffle else None)
            stop = len(seg) - len(seg) % batch_size if drop_last else len(seg)
            plan += [(i, b) for b in range(0, stop, batch_size)]
        if shuffle:
            plan = [plan[j] for j in rng.permutation(len(plan))]
        for i, b in plan[start:]:
            seg, order = segments[i], orders[i]
            idx = slice(b, b + batch_size) if order is None else torch.from_numpy(order[b : b + batch_size])
            yield Batch(seg.inputs[idx], seg.labels[idx], i)


def split_seeds(seed: int, num_train: int, num_valid: int) -> tuple[list[int], list[int]]:
    """Distinct per-segment seeds: train ones in ``[0, 2**31)``, valid ones in ``[2**31, 2**32)``."""
    _check_int("seed", seed, minimum=0)
    rng = np.random.default_rng(seed)
    train = rng.choice(_SEED_HALF, size=num_train, replace=False)
    valid = _SEED_HALF + rng.choice(_SEED_HALF, size=num_valid, replace=False)
    return [int(s) for s in train], [int(s) for s in valid]


def sample_distinct(rng: np.random.Generator, rows: int, population: int, size: int) -> np.ndarray:
    """``[rows, size]`` int64: each row ``size`` distinct values of ``range(population)``, uniformly random and in
    uniformly random order (every ordered tuple of distinct values equally likely).

    Two exact methods, picked by cost only. With few expected collisions (``size**2 <= population``): draw with
    replacement and redraw the later copies of any repeated value until none remain; this rule depends only on
    which slots are equal, never on the values, so the result is invariant under relabelling the population and
    hence uniform. Otherwise: a partial Fisher-Yates shuffle of ``range(population)``, vectorised over rows, in
    chunks of rows to bound memory.
    """
    if size > population:
        raise ValueError(f"cannot draw {size} distinct values from a population of {population}")
    if size * size <= population:
        out = rng.integers(0, population, size=(rows, size))
        while True:
            order = np.argsort(out, axis=1, kind="stable")
            ranked = np.take_along_axis(out, order, axis=1)
            repeat_ranked = np.zeros(ranked.shape, dtype=bool)
            repeat_ranked[:, 1:] = ranked[:, 1:] == ranked[:, :-1]
            if not repeat_ranked.any():
                return out
            repeat = np.empty_like(repeat_ranked)
            np.put_along_axis(repeat, order, repeat_ranked, axis=1)
            out[repeat] = rng.integers(0, population, size=int(repeat.sum()))
    out = np.empty((rows, size), dtype=np.int64)
    chunk = max(1, (1 << 23) // population)
    for lo in range(0, rows, chunk):
        n = min(rows, lo + chunk) - lo
        r = np.arange(n)
        perm = np.tile(np.arange(population, dtype=np.int64), (n, 1))
        for i in range(size):
            j = rng.integers(i, population, size=n)
            picked = perm[r, j]
            perm[r, j] = perm[:, i]
            perm[:, i] = picked
        out[lo : lo + n] = perm[:, :size]
    return out


# ----------------------------------------------------------------------------------------------------------------
# validation helpers: every message names the key, the value and what is allowed


def _check_int(key: str, value, minimum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {value!r}")


def _check_real(key: str, value, *, positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ConfigError(f"{key} must be a number > 0, got {value!r}")


def _check_bool(key: str, value) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise ConfigError(f"{key} must be true or false, got {value!r}")


def _check_name(cls_name: str, expected: str, value) -> None:
    if value != expected:
        raise ConfigError(f"name of a {cls_name} must be {expected!r}, got {value!r}")


def _dataclass_from_mapping(cls, mapping, where: str = ""):
    """Build dataclass ``cls`` from a mapping, refusing unknown keys (with the closest valid one) and missing ones."""
    if not isinstance(mapping, Mapping):
        raise ConfigError(f"{where or cls.__name__} must be a mapping of {cls.__name__} fields, got {mapping!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in mapping:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {where}{close[0]}?" if close else ""
            raise ConfigError(f"unknown key {where}{key} for {cls.__name__}{hint} (valid keys: {', '.join(fields)})")
    for name, f in fields.items():
        if name not in mapping and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}{name} is required for {cls.__name__} and was not given")
    return cls(**dict(mapping))
