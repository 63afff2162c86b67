"""The kernel tests' references are token loops of tiny tensor ops: intra-op threads only add
overhead there (on a 2-core CI machine, about 100x per op), so these tests run single-threaded."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
