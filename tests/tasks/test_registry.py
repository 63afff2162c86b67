"""Task registry, dict / OmegaConf round trips, TaskData batching, and a light import."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch

from momkit.config import ConfigError
from momkit.tasks import (
    TASKS,
    MQARConfig,
    MQARSegment,
    NeedleConfig,
    SelectiveCopyingConfig,
    TaskData,
    TextLMConfig,
    build_task,
    task_from_dict,
    task_to_dict,
)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    return str(path)


def _configs(text_file):
    return [
        MQARConfig(
            vocab_size=64, train=[MQARSegment(40, 32, 4), MQARSegment(20, 64, 8)], valid=[MQARSegment(8, 32, 4)]
        ),
        SelectiveCopyingConfig(seq_len=32, num_tokens=4, num_train_examples=20, num_valid_examples=5),
        NeedleConfig(seq_len=16, vocab_size=32, num_train_examples=20, num_valid_examples=5, depth=0.5),
        TextLMConfig(paths=[text_file], seq_len=32),
    ]


def test_registry_names_match_configs(text_file):
    assert set(TASKS) == {"mqar", "selective_copying", "needle", "text"}
    for name, cls in TASKS.items():
        assert {f.name: f.default for f in dataclasses.fields(cls)}["name"] == name


def test_dict_round_trip_and_build(text_file):
    for cfg in _configs(text_file):
        d = task_to_dict(cfg)
        again = task_from_dict(d)
        assert again == cfg and type(again) is type(cfg)
        data = build_task(d)
        assert isinstance(data, TaskData) and data.name == cfg.name and data.description
        assert data.train and data.valid and data.vocab_size >= 2
        for seg in data.train + data.valid:
            assert seg.inputs.max() < data.vocab_size and seg.inputs.min() >= 0


def test_omegaconf_structured_round_trip(text_file):
    omegaconf = pytest.importorskip("omegaconf")
    OmegaConf = omegaconf.OmegaConf
    for cfg in _configs(text_file):
        schema = OmegaConf.structured(type(cfg)) if not isinstance(cfg, TextLMConfig) else OmegaConf.structured(cfg)
        merged = OmegaConf.merge(schema, OmegaConf.create(task_to_dict(cfg)))
        assert OmegaConf.to_object(merged) == cfg
        assert task_from_dict(OmegaConf.create(task_to_dict(cfg))) == cfg, "a DictConfig works too"
    # a dotted override that breaks a constraint is caught when the object is made
    merged = OmegaConf.merge(OmegaConf.structured(MQARConfig), {"train": [{"num_kv_pairs": 100}]})
    with pytest.raises(ConfigError, match=r"train\[0\].num_kv_pairs=100 does not fit"):
        OmegaConf.to_object(merged)


@pytest.mark.parametrize(
    "d,match",
    [
        ({"name": "mqr"}, r"task.name='mqr' is not a known task; did you mean 'mqar'\?"),
        ({"vocab_size": 8}, r"task.name is required"),
        ({"name": "mqar", "vocab": 8}, r"unknown key vocab for MQARConfig; did you mean vocab_size\?"),
        ({"name": "text"}, r"paths is required for TextLMConfig"),
        ({"name": "needle", "depth": 2}, r"depth must be None \(uniform\) or a number in \[0, 1\], got 2"),
        ("mqar", r"task must be a mapping with a 'name' key"),
    ],
)
def test_task_from_dict_errors(d, match):
    with pytest.raises(ConfigError, match=match):
        task_from_dict(d)


def _mixed_data():
    return MQARConfig(
        vocab_size=64, train=[MQARSegment(50, 32, 4), MQARSegment(23, 64, 8)], valid=[MQARSegment(10, 32, 4)]
    ).build()


def test_batches_cover_each_example_once_and_keep_lengths_apart():
    data = _mixed_data()
    for shuffle in (False, True):
        batches = list(data.batches("train", 8, shuffle=shuffle, seed=1, epoch=0))
        assert len(batches) == data.num_batches("train", 8) == 7 + 3
        for b in batches:
            assert b.inputs.shape == b.labels.shape and b.inputs.shape[1] == data.train[b.segment].seq_len
        for i, seg in enumerate(data.train):
            rows = torch.cat([b.inputs for b in batches if b.segment == i])
            assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, seg.inputs.tolist()))
    ordered = list(data.batches("train", 8))
    assert [b.segment for b in ordered] == [0] * 7 + [1] * 3
    assert torch.equal(ordered[0].inputs, data.train[0].inputs[:8])


def test_batch_order_reproducible_by_seed_and_epoch_and_resumable():
    data = _mixed_data()

    def order(**kw):
        return [b.inputs for b in data.batches("train", 8, shuffle=True, **kw)]

    a, b = order(seed=0, epoch=0), order(seed=0, epoch=0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, order(seed=0, epoch=1)) if x.shape == y.shape)
    assert not all(torch.equal(x, y) for x, y in zip(a, order(seed=1, epoch=0)) if x.shape == y.shape)
    rest = order(seed=0, epoch=0, start=4)
    assert len(rest) == len(a) - 4 and all(torch.equal(x, y) for x, y in zip(a[4:], rest))


def test_drop_last_and_tensors():
    data = _mixed_data()
    full = list(data.batches("train", 8, drop_last=True, shuffle=True))
    assert len(full) == data.num_batches("train", 8, drop_last=True) == 6 + 2
    assert all(b.inputs.shape[0] == 8 for b in full)
    inputs, labels = data.tensors("valid")
    assert inputs.shape == (10, 32) and labels.shape == (10, 32)
    with pytest.raises(ValueError, match=r"the train split mixes sequence lengths \[32, 64\]; pass seq_len="):
        data.tensors("train")
    inputs, labels = data.tensors("train", seq_len=64)  # one length of a mixed split: its segments, in order
    want = [s for s in data.train if s.seq_len == 64]
    assert torch.equal(inputs, torch.cat([s.inputs for s in want])) and inputs.shape[1] == 64
    assert torch.equal(labels, torch.cat([s.labels for s in want]))
    with pytest.raises(ValueError, match=r"seq_len=48 is invalid: the train split has sequence lengths \[32, 64\]"):
        data.tensors("train", seq_len=48)
    with pytest.raises(ValueError, match=r"split must be one of \('train', 'valid'\), got 'test'"):
        data.split("test")
    with pytest.raises(ConfigError, match="batch_size must be an integer >= 1, got 0"):
        data.num_batches("train", 0)


def test_import_momkit_tasks_is_light():
    code = (
        "import sys, momkit.tasks; "
        "heavy = [m for m in ('triton', 'optuna', 'omegaconf', 'pandas', 'momkit.kernels') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import momkit.tasks pulled in {out.stdout.strip()}"
