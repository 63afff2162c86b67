"""Single-needle associative recall: one key-value pair hidden in a haystack, queried at the last position.

The simplest recall probe, and the one to sweep over depth (where the needle sits) and length: the model must
find the only earlier occurrence of the query key and emit the token that followed it.

Layout of one example, ``T = seq_len``, ``V = vocab_size``, needle position ``p``::

    position  0 ... p-1 | p   p+1 | p+2 ... T-2 | T-1
    inputs    haystack  | k   v   | haystack    | k
    labels    -100 ......................................| v

* Key ``k`` uniform in ``[1, V//2)``, value ``v`` uniform in ``[V//2, V)`` (MQAR's key and value ranges).
* Haystack tokens are uniform over ``[0, V)`` minus ``{k}``: the key occurs exactly twice, as the needle and as
  the query, so the answer is unambiguous. Values and other keys may occur in the haystack.
* ``p`` is uniform over ``0 .. T-3`` when ``depth`` is None; otherwise ``p = round(depth * (T - 3))``, with
  ``depth`` in ``[0, 1]`` (0: the needle opens the sequence; 1: it sits right before the query).
* Exactly one position per example (the last) is supervised, with label ``v``; needs ``seq_len >= 3`` and
  ``vocab_size >= 4``.

This is zoology's single-query associative recall reduced to one pair in noise, the synthetic form of
needle-in-a-haystack retrieval. Randomness comes from one ``numpy.random.Generator(seed)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from momkit.config import ConfigError
from momkit.tasks.base import IGNORE_INDEX, Segment, TaskData, _check_int, _check_name, _check_real, split_seeds


def _check_args(num_examples, seq_len, vocab_size, depth, seed, names=None) -> None:
    nm = {"num_examples": "num_examples", **(names or {})}
    _check_int(nm["num_examples"], num_examples, minimum=1)
    _check_int("seq_len", seq_len, minimum=3)
    _check_int("vocab_size", vocab_size, minimum=4)
    _check_int("seed", seed, minimum=0)
    if depth is not None:
        _check_real("depth", depth)
        if not 0 <= depth <= 1:
            raise ConfigError(f"depth must be None (uniform) or a number in [0, 1], got {depth!r}")


def make_needle(
    num_examples: int, seq_len: int, vocab_size: int, depth: float | None = None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Single-needle recall examples as ``(inputs, labels)``, int64 ``[num_examples, seq_len]``; see the module."""
    _check_args(num_examples, seq_len, vocab_size, depth, seed)
    N, T, V = num_examples, seq_len, vocab_size
    rng = np.random.default_rng(seed)
    half = V // 2
    keys = rng.integers(1, half, size=N)
    values = rng.integers(half, V, size=N)
    # uniform over [0, V) minus the key: draw from V - 1 tokens and step over the key
    inputs = rng.integers(0, V - 1, size=(N, T))
    inputs += inputs >= keys[:, None]
    if depth is None:
        pos = rng.integers(0, T - 2, size=N)
    else:
        pos = np.full(N, round(depth * (T - 3)), dtype=np.int64)
    rows = np.arange(N)
    inputs[rows, pos] = keys
    inputs[rows, pos + 1] = values
    inputs[:, T - 1] = keys
    labels = np.full((N, T), IGNORE_INDEX, dtype=np.int64)
    labels[:, T - 1] = values
    return torch.from_numpy(inputs), torch.from_numpy(labels)


@dataclass
class NeedleConfig:
    """Single-needle associative recall task; ``depth=None`` places the needle uniformly at random."""

    name: str = "needle"
    vocab_size: int = 256
    seq_len: int = 256
    depth: float | None = None
    num_train_examples: int = 10_000
    num_valid_examples: int = 1_000
    seed: int = 0

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        _check_name(type(self).__name__, "needle", self.name)
        _check_int("num_valid_examples", self.num_valid_examples, minimum=1)
        _check_args(
            self.num_train_examples,
            self.seq_len,
            self.vocab_size,
            self.depth,
            self.seed,
            {"num_examples": "num_train_examples"},
        )

    def build(self) -> TaskData:
        self.validate()
        (train_seed,), (valid_seed,) = split_seeds(self.seed, 1, 1)
        info = {"seq_len": self.seq_len} if self.depth is None else {"seq_len": self.seq_len, "depth": self.depth}
        train = Segment(
            *make_needle(self.num_train_examples, self.seq_len, self.vocab_size, self.depth, train_seed),
            info=dict(info),
        )
        valid = Segment(
            *make_needle(self.num_valid_examples, self.seq_len, self.vocab_size, self.depth, valid_seed),
            info=dict(info),
        )
        return TaskData(
            name=self.name, vocab_size=self.vocab_size, description=self.describe(), train=[train], valid=[valid]
        )

    def describe(self) -> str:
        where = "uniform depth" if self.depth is None else f"depth={self.depth}"
        return (
            f"single-needle associative recall: one key-value pair in a haystack, queried at the end ({where}); "
            f"vocab_size={self.vocab_size}, seq_len={self.seq_len}, seed={self.seed}; "
            f"train {self.num_train_examples}, valid {self.num_valid_examples} examples"
        )
