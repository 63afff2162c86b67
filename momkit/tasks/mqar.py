"""MQAR, multi-query associative recall, with the semantics of zoology's ``multiquery_ar``.

Arora, Eyuboglu et al., "Zoology: Measuring and improving recall in efficient language models" (2023);
reference generator: ``zoology/data/multiquery_ar.py`` in HazyResearch/zoology.

Layout of one example, ``n = num_kv_pairs``, ``p = num_passes``, ``T = seq_len``, ``V = vocab_size``::

    position  0    1    2    3   ...  2n-2  2n-1 | (block repeated p times) | C, C+1, ..., T-1
    inputs    k_1  v_1  k_2  v_2 ...  k_n   v_n  |  ...                    | query region
    labels    -100 everywhere, except labels[C + 2 g_i] = v_i

* Key-value block: ``n`` keys drawn without replacement from ``[1, V//2)`` and ``n`` values drawn without
  replacement from ``[V//2, V)``; pair ``i`` is ``(k_i, v_i)`` at positions ``2i, 2i+1``. With ``num_passes = p``
  the block is written ``p`` times in a row (JRT-style repeated context), so it ends at ``C = 2 n p``.
* Query region, positions ``C .. T-1``: ``S = (T - C) // 2`` query slots at the even offsets ``C + 2j``,
  ``j = 0 .. S-1``. Every key is queried exactly once: key ``k_i`` is written at slot ``g_i``, the ``g_i`` distinct.
* Power law: slot ``j`` has weight ``power_a * (j + 1) ** (power_a - 1)`` (normalised); slots are drawn without
  replacement by successive sampling, and pair ``i`` takes the ``i``-th slot drawn. ``power_a = 1`` is uniform;
  small ``power_a`` (default 0.01) puts queries close to the key-value block, and, because the first draws tend
  to be the nearest slots, early pairs tend to be queried first (both exactly as in zoology).
* Label shift: think of the query region as the sequence ``... k_i v_i ...`` (each value right after its key,
  as in the block). Zoology writes that sequence with length ``T + 1``, ``v_i`` at ``C + 2 g_i + 1``, and shifts
  it (``inputs = seq[:-1]``, ``labels = seq[1:]``), so the label *at the query token* is ``v_i``; the value itself
  is never written into the inputs (position ``C + 2 g_i + 1`` holds filler). We write ``labels[C + 2 g_i] = v_i``
  directly, which is the same thing. Exactly ``n`` positions per example are supervised.
* Filler: every other position of the query region (odd offsets, unused slots, and a last position when
  ``T - C`` is odd) is 0 when ``random_non_queries=False`` (0 is never a key or a value), and a token drawn
  uniformly from ``[0, V)`` when True. A random filler may equal a key of the block: that occurrence is an
  unsupervised distractor, as in zoology.

The layout needs ``seq_len >= 2 n (p + 1)`` (the block plus one slot per pair; zoology's assertion) and
``vocab_size >= 2 n + 2`` (``n`` distinct keys in ``[1, V//2)``).

Deliberate differences from zoology (same distributions, different random streams):

* All randomness comes from one ``numpy.random.Generator(seed)``. Zoology seeds the global NumPy state and draws
  the random fillers from the global, unseeded torch RNG, so its fillers are not reproducible from the seed.
* Sampling is vectorised (no per-row ``np.random.choice``), so a seed gives different, equally distributed data.
* Zoology also asserts an even ``seq_len`` and ``vocab_size > seq_len``; the layout needs neither, so we don't.
* Invalid arguments raise ``ConfigError`` naming the argument, the value and what is allowed (zoology asserts).

``MQARConfig`` is the typed task config (zoology's ``DataConfig`` with ``MQARConfig`` segments rolled into one):
``train`` and ``valid`` are lists of ``MQARSegment(num_examples, seq_len, num_kv_pairs)``; each segment gets its
own seed from ``split_seeds`` (train and valid seeds disjoint) and stays its own block of batches.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from momkit.config import ConfigError
from momkit.tasks.base import (
    IGNORE_INDEX,
    Segment,
    TaskData,
    _check_bool,
    _check_int,
    _check_name,
    _check_real,
    _dataclass_from_mapping,
    sample_distinct,
    split_seeds,
)


def _check_mqar_args(
    num_examples, seq_len, vocab_size, num_kv_pairs, power_a, num_passes, random_non_queries, seed, names=None
) -> None:
    """Validate the arguments of ``make_mqar``; ``names`` renames keys in messages (``train[1].seq_len``)."""
    nm = {k: k for k in ("num_examples", "seq_len", "vocab_size", "num_kv_pairs", "num_passes")}
    nm.update(names or {})
    _check_int(nm["num_examples"], num_examples, minimum=1)
    _check_int(nm["seq_len"], seq_len, minimum=1)
    _check_int(nm["vocab_size"], vocab_size, minimum=1)
    _check_int(nm["num_kv_pairs"], num_kv_pairs, minimum=1)
    _check_real("power_a", power_a, positive=True)
    _check_int(nm["num_passes"], num_passes, minimum=1)
    _check_bool("random_non_queries", random_non_queries)
    _check_int("seed", seed, minimum=0)
    need_len = 2 * num_kv_pairs * (num_passes + 1)
    if seq_len < need_len:
        raise ConfigError(
            f"{nm['num_kv_pairs']}={num_kv_pairs} does not fit in {nm['seq_len']}={seq_len} with "
            f"{nm['num_passes']}={num_passes}: the key-value block (2*num_kv_pairs*num_passes tokens) plus one "
            f"query slot per pair needs seq_len >= 2*num_kv_pairs*(num_passes+1) = {need_len}"
        )
    need_vocab = 2 * num_kv_pairs + 2
    if vocab_size < need_vocab:
        raise ConfigError(
            f"{nm['vocab_size']}={vocab_size} is too small for {nm['num_kv_pairs']}={num_kv_pairs}: keys are drawn "
            f"without replacement from [1, vocab_size//2), which needs vocab_size >= 2*num_kv_pairs+2 = {need_vocab}"
        )


def make_mqar(
    num_examples: int,
    seq_len: int,
    vocab_size: int,
    num_kv_pairs: int,
    power_a: float = 0.01,
    num_passes: int = 1,
    random_non_queries: bool = True,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MQAR examples as ``(inputs, labels)``, int64 ``[num_examples, seq_len]``; see the module docstring."""
    _check_mqar_args(num_examples, seq_len, vocab_size, num_kv_pairs, power_a, num_passes, random_non_queries, seed)
    N, T, V, n = num_examples, seq_len, vocab_size, num_kv_pairs
    rng = np.random.default_rng(seed)
    half = V // 2
    keys = 1 + sample_distinct(rng, N, half - 1, n)  # [N, n] in [1, V//2)
    values = half + sample_distinct(rng, N, V - half, n)  # [N, n] in [V//2, V)

    C = 2 * n * num_passes
    inputs = np.zeros((N, T), dtype=np.int64)
    block = np.empty((N, 2 * n), dtype=np.int64)
    block[:, 0::2], block[:, 1::2] = keys, values
    inputs[:, :C] = np.tile(block, (1, num_passes))

    # Successive sampling of query slots by the power law, as an exponential race: slot j finishes at
    # Exp(1) / weight_j, and the order of finishing is the order of drawing without replacement.
    S = (T - C) // 2
    weight = power_a * np.arange(1, S + 1, dtype=np.float64) ** (power_a - 1)
    race = rng.exponential(size=(N, S)) / (weight / weight.sum())
    slots = np.argsort(race, axis=1)[:, :n]  # [N, n]: pair i -> the i-th slot drawn
    query_pos = C + 2 * slots

    np.put_along_axis(inputs, query_pos, keys, axis=1)
    labels = np.full((N, T), IGNORE_INDEX, dtype=np.int64)
    np.put_along_axis(labels, query_pos, values, axis=1)

    if random_non_queries:
        filler = np.zeros((N, T), dtype=bool)
        filler[:, C:] = True
        np.put_along_axis(filler, query_pos, False, axis=1)
        inputs[filler] = rng.integers(0, V, size=int(filler.sum()))
    return torch.from_numpy(inputs), torch.from_numpy(labels)


@dataclass
class MQARSegment:
    """One block of MQAR examples: how many, how long, how many key-value pairs (zoology's per-segment config)."""

    num_examples: int = 1_000
    seq_len: int = 64
    num_kv_pairs: int = 4


def _default_train() -> list[MQARSegment]:
    return [MQARSegment(num_examples=10_000, seq_len=64, num_kv_pairs=4)]


def _default_valid() -> list[MQARSegment]:
    return [MQARSegment(num_examples=1_000, seq_len=64, num_kv_pairs=4)]


@dataclass
class MQARConfig:
    """MQAR task: a mixture of ``(num_examples, seq_len, num_kv_pairs)`` segments for train and for valid.

    ``valid`` plays the role of zoology's test configs. The shared fields apply to every segment.
    ``MQARConfig.zoology()`` gives zoology's standard mixture.
    """

    name: str = "mqar"
    vocab_size: int = 8_192
    train: list[MQARSegment] = field(default_factory=_default_train)
    valid: list[MQARSegment] = field(default_factory=_default_valid)
    power_a: float = 0.01
    num_passes: int = 1
    random_non_queries: bool = True
    seed: int = 0

    def __post_init__(self):
        for split in ("train", "valid"):
            segs = getattr(self, split)
            if isinstance(segs, (str, bytes)) or not isinstance(segs, Sequence) or len(segs) == 0:
                raise ConfigError(
                    f"{split} must be a non-empty list of segments (num_examples, seq_len, num_kv_pairs), got {segs!r}"
                )
            setattr(self, split, [_as_segment(s, f"{split}[{i}]") for i, s in enumerate(segs)])
        self.validate()

    def validate(self) -> None:
        _check_name(type(self).__name__, "mqar", self.name)
        for split in ("train", "valid"):
            for i, seg in enumerate(getattr(self, split)):
                names = {k: f"{split}[{i}].{k}" for k in ("num_examples", "seq_len", "num_kv_pairs")}
                _check_mqar_args(**self._segment_args(seg, self.seed), names=names)

    def build(self) -> TaskData:
        self.validate()
        train_seeds, valid_seeds = split_seeds(self.seed, len(self.train), len(self.valid))
        splits = {}
        for split, seeds in (("train", train_seeds), ("valid", valid_seeds)):
            splits[split] = [
                Segment(
                    *make_mqar(**self._segment_args(seg, seed)),
                    info={"seq_len": seg.seq_len, "num_kv_pairs": seg.num_kv_pairs},
                )
                for seg, seed in zip(getattr(self, split), seeds)
            ]
        return TaskData(name="mqar", vocab_size=self.vocab_size, description=self.describe(), **splits)

    def _segment_args(self, seg: MQARSegment, seed: int) -> dict:
        return {
            "num_examples": seg.num_examples,
            "seq_len": seg.seq_len,
            "vocab_size": self.vocab_size,
            "num_kv_pairs": seg.num_kv_pairs,
            "power_a": self.power_a,
            "num_passes": self.num_passes,
            "random_non_queries": self.random_non_queries,
            "seed": seed,
        }

    def describe(self) -> str:
        def mix(segs):
            return " + ".join(f"{s.num_examples} x (seq_len={s.seq_len}, kv={s.num_kv_pairs})" for s in segs)

        return (
            f"MQAR (zoology multiquery_ar): vocab_size={self.vocab_size}, power_a={self.power_a}, "
            f"num_passes={self.num_passes}, random_non_queries={self.random_non_queries}, seed={self.seed}; "
            f"train: {mix(self.train)}; valid: {mix(self.valid)}"
        )

    @classmethod
    def zoology(cls, **overrides) -> MQARConfig:
        """Zoology's standard MQAR mixture (its ``original_mqar_configs``): vocabulary 8192, five training segments
        up to length 256 and 64 pairs, seven test segments up to length 1024 and 256 pairs."""
        train = [(100_000, 64, 4), (20_000, 128, 8), (20_000, 256, 16), (20_000, 256, 32), (20_000, 256, 64)]
        valid = [
            (1_000, 64, 4),
            (1_000, 64, 8),
            (1_000, 64, 16),
            (1_000, 128, 32),
            (1_000, 256, 64),
            (1_000, 512, 128),
            (1_000, 1024, 256),
        ]
        kwargs = {
            "vocab_size": 8_192,
            "train": [MQARSegment(*t) for t in train],
            "valid": [MQARSegment(*t) for t in valid],
        }
        kwargs.update(overrides)
        return cls(**kwargs)


def _as_segment(obj, where: str) -> MQARSegment:
    if isinstance(obj, MQARSegment):
        return obj
    if isinstance(obj, Mapping):
        return _dataclass_from_mapping(MQARSegment, obj, where=f"{where}.")
    raise ConfigError(f"{where} must be a segment mapping with keys num_examples, seq_len, num_kv_pairs, got {obj!r}")
