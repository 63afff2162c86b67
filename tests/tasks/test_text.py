"""Byte-level text LM: tokenizer round-trip, the per-document train/valid split, blocks, errors."""

from __future__ import annotations

import pytest
import torch

from momkit.config import ConfigError
from momkit.tasks import IGNORE_INDEX, ByteTokenizer, TextLMConfig, lm_blocks


@pytest.mark.parametrize("text", ["", "hello, world\n", "MoM: Mixture-of-Memories — ∑ 記憶 🧠", "tab\tnul\x00end"])
def test_tokenizer_round_trip_text(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids.dtype == torch.int64 and ids.dim() == 1
    assert ids.tolist() == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(text, add_eos=True)) == text


def test_tokenizer_all_bytes_and_eos():
    tok = ByteTokenizer()
    raw = bytes(range(256))
    ids = tok.encode(raw, add_eos=True)
    assert tok.vocab_size == 257 and tok.eos_id == 256
    assert ids.tolist() == [*range(256), 256]
    assert tok.decode_bytes(ids) == raw
    assert tok.decode(tok.encode(b"\xff\xfe")) == "\ufffd\ufffd", "invalid UTF-8 is replaced, not raised"
    with pytest.raises(ValueError, match=r"ids must be in \[0, 256\], got 300"):
        tok.decode([65, 300])
    with pytest.raises(TypeError, match="str or bytes"):
        tok.encode(42)


def test_lm_blocks_shift():
    tokens = torch.arange(23)
    inputs, labels = lm_blocks(tokens, 5)
    assert inputs.shape == labels.shape == (4, 5)  # (23 - 1) // 5
    assert torch.equal(inputs.flatten(), torch.arange(20)) and torch.equal(labels, inputs + 1)
    assert lm_blocks(torch.arange(5), 5)[0].shape == (0, 5)


def _write(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_split_sizes_and_contents(tmp_path):
    a = _write(tmp_path / "a.txt", b"a" * 1000)
    b = _write(tmp_path / "b.txt", "é".encode() * 250)  # 500 bytes
    cfg = TextLMConfig(paths=[str(a), str(b)], seq_len=32, valid_fraction=0.2)
    data = cfg.build()
    assert data.vocab_size == 257 and data.name == "text"
    n_train = 800 + 1 + 400 + 1  # heads of both files, each followed by EOS
    n_valid = 200 + 1 + 100 + 1
    assert len(data.train[0]) == (n_train - 1) // 32 and len(data.valid[0]) == (n_valid - 1) // 32
    for seg in data.train + data.valid:
        assert seg.seq_len == 32 and (seg.labels != IGNORE_INDEX).all()
        assert torch.equal(seg.inputs[:, 1:], seg.labels[:, :-1]), "labels are the next tokens"
        assert torch.equal(seg.inputs[1:, 0], seg.labels[:-1, -1]), "blocks are contiguous"
    train_stream = data.train[0].inputs.flatten()
    assert train_stream[800].item() == 256 and train_stream[:800].eq(ord("a")).all()
    valid_stream = data.valid[0].inputs.flatten()
    assert valid_stream[:200].eq(ord("a")).all() and valid_stream[200].item() == 256
    assert "2 file(s), 1500 bytes" in data.description


def test_directory_and_glob(tmp_path):
    _write(tmp_path / "d" / "x.txt", b"x" * 300)
    _write(tmp_path / "d" / "sub" / "y.txt", b"y" * 300)
    _write(tmp_path / "d" / "z.md", b"z" * 300)
    data = TextLMConfig(paths=[str(tmp_path / "d")], seq_len=16, valid_fraction=0.5).build()
    stream = data.train[0].inputs.flatten().tolist()
    assert ord("z") not in stream and ord("x") in stream and ord("y") in stream
    # sorted order: sub/y.txt before x.txt
    assert stream.index(ord("y")) < stream.index(ord("x"))
    data_md = TextLMConfig(paths=[str(tmp_path / "d")], seq_len=16, valid_fraction=0.5, glob="*.md").build()
    assert set(data_md.train[0].inputs.flatten().tolist()) == {ord("z")}  # 150 z's and EOS; the tail is dropped


def test_text_errors(tmp_path):
    small = _write(tmp_path / "s.txt", b"tiny text")
    with pytest.raises(ConfigError, match=r"paths\[1\]='.*nope.txt' must be an existing file or directory"):
        TextLMConfig(paths=[str(small), str(tmp_path / "nope.txt")])
    with pytest.raises(ConfigError, match=r"paths must be a non-empty list of files or directories, got '.*s.txt'"):
        TextLMConfig(paths=str(small))
    with pytest.raises(ConfigError, match=r"paths must be a non-empty list .* got \[\]"):
        TextLMConfig(paths=[])
    with pytest.raises(ConfigError, match=r"valid_fraction must be a number in \(0, 1\), got 1.0"):
        TextLMConfig(paths=[str(small)], valid_fraction=1.0)
    with pytest.raises(ConfigError, match=r"seq_len must be an integer >= 1, got 0"):
        TextLMConfig(paths=[str(small)], seq_len=0)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ConfigError, match=r"is a directory with no file matching glob='\*\*/\*.txt'"):
        TextLMConfig(paths=[str(tmp_path / "empty_dir")])
    with pytest.raises(ConfigError, match=r"the train split has 9 tokens, fewer than seq_len\+1 = 65"):
        TextLMConfig(paths=[str(small)], seq_len=64).build()
