"""Test-wide setup: seeds, markers, and NaN-poisoned fresh allocations.

Fresh ``torch.empty`` allocations are filled with NaN (PyTorch's deterministic mode with
``fill_uninitialized_memory``), so an output element that a kernel or a path forgets to write
cannot pass a comparison.
"""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch


def pytest_configure(config):
    # Triton reads TRITON_INTERPRET when kernels are defined: set it before anything imports them.
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    # pytest-xdist runs one process per core: one thread each, or OpenMP threads spinning at their
    # barriers on an oversubscribed machine make small ops take milliseconds instead of microseconds.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed_and_poison():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)
    torch.utils.deterministic.fill_uninitialized_memory = prev_fill
