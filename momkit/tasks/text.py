"""Plain-text language modelling on local files, byte-level, offline.

Tokenizer: ``ByteTokenizer`` maps text to its UTF-8 bytes, ids ``0..255``, plus one special, ``EOS = 256``
(end of document), so ``vocab_size = 257``. Nothing is downloaded; every byte string round-trips exactly, and
so does every ``str`` (decoding replaces invalid UTF-8, which only arises from ids not produced by ``encode``).

Data: each file is a document (a directory in ``paths`` contributes every file under it matching ``glob``, in
sorted order). Every document is split at ``floor((1 - valid_fraction) * len)`` bytes: the head goes to train,
the tail to valid, so both splits see every document and no byte is in both. Each split is the concatenation
of its pieces, each followed by ``EOS``. A split of ``n`` tokens is cut into ``(n - 1) // seq_len``
non-overlapping blocks; block ``b`` has ``inputs = tokens[b*T : b*T + T]`` and ``labels = tokens[b*T + 1 :
b*T + T + 1]`` (next-token prediction, every position supervised); the leftover tail is dropped.

``perplexity`` (in ``momkit.tasks.metrics``) is the exponential of the mean per-token cross-entropy, here per
byte (including the EOS predictions).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from momkit.config import ConfigError
from momkit.tasks.base import Segment, TaskData, _check_int, _check_name, _check_real


class ByteTokenizer:
    """UTF-8 bytes as ids ``0..255`` and ``EOS = 256``; ``vocab_size = 257``."""

    vocab_size = 257
    eos_id = 256

    def encode(self, text: str | bytes, *, add_eos: bool = False) -> torch.Tensor:
        """1-D int64 ids of ``text`` (a ``str`` is UTF-8 encoded), with ``EOS`` appended when ``add_eos``."""
        if isinstance(text, str):
            text = text.encode("utf-8")
        if not isinstance(text, (bytes, bytearray)):
            raise TypeError(f"encode expects str or bytes, got {type(text).__name__}")
        ids = torch.from_numpy(np.frombuffer(bytes(text), dtype=np.uint8).astype(np.int64))
        if add_eos:
            ids = torch.cat([ids, torch.tensor([self.eos_id])])
        return ids

    def decode_bytes(self, ids) -> bytes:
        """The bytes of ``ids`` with ``EOS`` dropped; other ids outside ``0..256`` raise ValueError."""
        ids = torch.as_tensor(ids, dtype=torch.int64).reshape(-1)
        bad = (ids < 0) | (ids > self.eos_id)
        if bad.any():
            raise ValueError(f"ids must be in [0, {self.eos_id}], got {ids[bad][0].item()}")
        return bytes(ids[ids != self.eos_id].to(torch.uint8).tolist())

    def decode(self, ids) -> str:
        """Text of ``ids``: ``EOS`` dropped, invalid UTF-8 replaced by U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


def lm_blocks(tokens: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut a 1-D token stream into ``(n - 1) // seq_len`` next-token blocks ``(inputs, labels)`` ``[N, seq_len]``."""
    _check_int("seq_len", seq_len, minimum=1)
    num = (tokens.numel() - 1) // seq_len if tokens.numel() else 0
    inputs = tokens[: num * seq_len].reshape(num, seq_len)
    labels = tokens[1 : num * seq_len + 1].reshape(num, seq_len)
    return inputs.clone(), labels.clone()


def find_files(paths: Sequence[str | os.PathLike], glob: str = "**/*.txt") -> list[Path]:
    """The files named by ``paths``: a file as itself, a directory as its files matching ``glob``, sorted."""
    files = []
    for i, p in enumerate(paths):
        path = Path(p)
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = sorted(f for f in path.glob(glob) if f.is_file())
            if not found:
                raise ConfigError(f"paths[{i}]={str(p)!r} is a directory with no file matching glob={glob!r}")
            files += found
        else:
            raise ConfigError(f"paths[{i}]={str(p)!r} must be an existing file or directory; it does not exist")
    return files


@dataclass
class TextLMConfig:
    """Byte-level language modelling on local text files (relative paths are relative to the working directory)."""

    paths: list[str]
    name: str = "text"
    seq_len: int = 256
    valid_fraction: float = 0.1
    glob: str = "**/*.txt"

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        _check_name(type(self).__name__, "text", self.name)
        if isinstance(self.paths, (str, bytes, os.PathLike)) or not isinstance(self.paths, Sequence) or not self.paths:
            raise ConfigError(f"paths must be a non-empty list of files or directories, got {self.paths!r}")
        _check_int("seq_len", self.seq_len, minimum=1)
        _check_real("valid_fraction", self.valid_fraction)
        if not 0 < self.valid_fraction < 1:
            raise ConfigError(f"valid_fraction must be a number in (0, 1), got {self.valid_fraction!r}")
        if not isinstance(self.glob, str) or not self.glob:
            raise ConfigError(f"glob must be a non-empty pattern string, got {self.glob!r}")
        find_files(self.paths, self.glob)

    def build(self) -> TaskData:
        self.validate()
        tok = ByteTokenizer()
        files = find_files(self.paths, self.glob)
        pieces = {"train": [], "valid": []}
        total = 0
        for f in files:
            data = f.read_bytes()
            total += len(data)
            cut = int((1 - self.valid_fraction) * len(data))
            pieces["train"].append(tok.encode(data[:cut], add_eos=True))
            pieces["valid"].append(tok.encode(data[cut:], add_eos=True))
        splits = {}
        for split, parts in pieces.items():
            stream = torch.cat(parts)
            if stream.numel() < self.seq_len + 1:
                raise ConfigError(
                    f"the {split} split has {stream.numel()} tokens, fewer than seq_len+1 = {self.seq_len + 1} "
                    f"needed for one block ({total} bytes in {len(files)} file(s), valid_fraction="
                    f"{self.valid_fraction}); use more text, a smaller seq_len or another valid_fraction"
                )
            splits[split] = [Segment(*lm_blocks(stream, self.seq_len), info={"seq_len": self.seq_len})]
        n_train, n_valid = len(splits["train"][0]), len(splits["valid"][0])
        description = (
            f"byte-level LM on {len(files)} file(s), {total} bytes (vocab 256 bytes + EOS); "
            f"{n_train} train / {n_valid} valid blocks of seq_len={self.seq_len}, valid_fraction={self.valid_fraction}"
        )
        return TaskData(name=self.name, vocab_size=tok.vocab_size, description=description, **splits)
