"""Selective copying (Gu & Dao, "Mamba", 2023, section 3.1 and appendix E.1).

The model reads a long stretch of noise in which a few data tokens sit at random positions, then a run of
marker tokens; at the j-th marker it must emit the j-th data token. Unlike plain copying, the data positions
vary per example, so a time-invariant (LTI) filter cannot solve it: the model must select by content.

Layout of one example, ``M = num_tokens``, ``T = seq_len``, ``V = vocab_size``, data region ``D = T - M``::

    position  0 ........................ D-1 | D ....... T-1
    inputs    0 0 x_1 0 0 0 x_2 0 ... x_M 0  | V-1 ... V-1        (M markers)
    labels    -100 ......................... | x_1 ....... x_M

* Token roles: ``0`` is noise, ``V-1`` is the marker, data tokens are drawn uniformly *with* replacement from
  ``[1, V-1)`` (as in the reference code, so repeats are possible).
* The ``M`` data positions are distinct, uniformly random among the ``D`` data-region positions, and sorted:
  ``x_j`` is the j-th data token from the left and the label at marker ``j`` (position ``D + j - 1``).
* Exactly ``M`` positions per example are supervised; needs ``seq_len >= 2 * num_tokens`` and ``vocab_size >= 3``.

Correspondence with the reference generator (``torch_copying_data(L, M, A, variable=True)`` in state-spaces/s4,
used by the Mamba paper): ``A = vocab_size``, ``M = num_tokens``, ``L = seq_len - 2 * num_tokens`` noise tokens.
The reference returns the ``M`` targets separately; here they are the labels of the marker positions, the
``(inputs, labels)`` convention of every momkit task. The paper's setting is ``L = 4096, M = 16, A = 16``, i.e.
``seq_len = 4128``. Randomness comes from one ``numpy.random.Generator(seed)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from momkit.config import ConfigError
from momkit.tasks.base import (
    IGNORE_INDEX,
    Segment,
    TaskData,
    _check_int,
    _check_name,
    sample_distinct,
    split_seeds,
)


def _check_args(num_examples, seq_len, vocab_size, num_tokens, seed, names=None) -> None:
    nm = {"num_examples": "num_examples", **(names or {})}
    _check_int(nm["num_examples"], num_examples, minimum=1)
    _check_int("seq_len", seq_len, minimum=2)
    _check_int("vocab_size", vocab_size, minimum=3)
    _check_int("num_tokens", num_tokens, minimum=1)
    _check_int("seed", seed, minimum=0)
    if seq_len < 2 * num_tokens:
        raise ConfigError(
            f"num_tokens={num_tokens} does not fit in seq_len={seq_len}: the data region (seq_len - num_tokens "
            f"positions) must hold num_tokens distinct positions, so seq_len >= 2*num_tokens = {2 * num_tokens}"
        )


def make_selective_copying(
    num_examples: int, seq_len: int, vocab_size: int = 16, num_tokens: int = 16, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Selective-copying examples as ``(inputs, labels)``, int64 ``[num_examples, seq_len]``; see the module."""
    _check_args(num_examples, seq_len, vocab_size, num_tokens, seed)
    N, T, V, M = num_examples, seq_len, vocab_size, num_tokens
    D = T - M
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, V - 1, size=(N, M))
    positions = np.sort(sample_distinct(rng, N, D, M), axis=1)
    inputs = np.zeros((N, T), dtype=np.int64)
    np.put_along_axis(inputs, positions, tokens, axis=1)
    inputs[:, D:] = V - 1
    labels = np.full((N, T), IGNORE_INDEX, dtype=np.int64)
    labels[:, D:] = tokens
    return torch.from_numpy(inputs), torch.from_numpy(labels)


@dataclass
class SelectiveCopyingConfig:
    """Selective copying task (Mamba). Defaults are CPU-sized; the paper uses seq_len=4128, num_tokens=16."""

    name: str = "selective_copying"
    vocab_size: int = 16
    seq_len: int = 256
    num_tokens: int = 16
    num_train_examples: int = 10_000
    num_valid_examples: int = 1_000
    seed: int = 0

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        _check_name(type(self).__name__, "selective_copying", self.name)
        _check_int("num_valid_examples", self.num_valid_examples, minimum=1)
        _check_args(
            self.num_train_examples,
            self.seq_len,
            self.vocab_size,
            self.num_tokens,
            self.seed,
            {"num_examples": "num_train_examples"},
        )

    def build(self) -> TaskData:
        self.validate()
        (train_seed,), (valid_seed,) = split_seeds(self.seed, 1, 1)
        info = {"seq_len": self.seq_len, "num_tokens": self.num_tokens}
        make = make_selective_copying
        train = Segment(
            *make(self.num_train_examples, self.seq_len, self.vocab_size, self.num_tokens, train_seed), info=dict(info)
        )
        valid = Segment(
            *make(self.num_valid_examples, self.seq_len, self.vocab_size, self.num_tokens, valid_seed), info=dict(info)
        )
        return TaskData(
            name=self.name, vocab_size=self.vocab_size, description=self.describe(), train=[train], valid=[valid]
        )

    def describe(self) -> str:
        return (
            f"selective copying (Mamba): copy {self.num_tokens} data tokens scattered in "
            f"{self.seq_len - self.num_tokens} noise positions, after {self.num_tokens} markers; "
            f"vocab_size={self.vocab_size}, seq_len={self.seq_len}, seed={self.seed}; "
            f"train {self.num_train_examples}, valid {self.num_valid_examples} examples"
        )
