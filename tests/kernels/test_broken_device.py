"""The GPU suite's guard against sticky CUDA errors (tests/kernels/conftest.py): a process whose device stopped
working (``momkit.train.loop.device_lost``, which sweep workers ask too) names the test after which it did and
ends, instead of failing every later test at its set-up."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest


def _conftest():
    spec = importlib.util.spec_from_file_location("kernels_conftest", Path(__file__).with_name("conftest.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_worker_ends_and_a_single_process_stops(monkeypatch, capsys):
    conftest = _conftest()
    exits = []

    def fake_exit(code):
        exits.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(os, "_exit", fake_exit)
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw3")
    with pytest.raises(SystemExit):
        conftest.end_broken_process("t.py::test_x[gpu]", "RuntimeError: an illegal memory access was encountered")
    assert exits == [3]
    err = capsys.readouterr().err
    assert "after t.py::test_x[gpu] (RuntimeError: an illegal memory access" in err and "ending this worker" in err
    monkeypatch.delenv("PYTEST_XDIST_WORKER")
    with pytest.raises(pytest.exit.Exception, match="after t.py::test_x"):
        conftest.end_broken_process("t.py::test_x[gpu]", "RuntimeError: an illegal memory access was encountered")
    assert exits == [3]


def test_a_device_that_cannot_add_is_lost(monkeypatch):
    import torch

    from momkit.train import loop

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore lines")

    monkeypatch.setattr(loop.torch, "ones", broken)
    lost = loop.device_lost(torch.device("cuda", 0))
    assert lost == "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert loop.device_lost(torch.device("cpu")) is None
