"""The kernel tests' references are token loops of tiny tensor ops: intra-op threads only add
overhead there (on a 2-core CI machine, about 100x per op), so these tests run single-threaded.

On a GPU each test records its peak device memory (``peak_cuda_mib`` in the JUnit report) and hands
its cached blocks back to the device afterwards: the GPU suite runs several pytest-xdist workers on
one card, and a worker's caching allocator would otherwise keep the peak of the largest test it ran
(the float64 token-loop references with autograd are the large ones: about 10 GiB for titans at
T = 1000, K = V = 256) out of reach of the others. The tests with the largest references share the
xdist group ``large_reference``, which ``--dist loadgroup`` (benchmarks/gpu_tests.py) runs on one
worker, one at a time.

Some CUDA errors (an illegal memory access) are sticky: every later test of the process then fails at its
set-up, whatever it tests, and a fast-failing xdist worker is handed more and more of the suite, so that one
fault shows as dozens of set-up errors in unrelated tests. After each GPU test the process
checks that its device still works; where it does not, it names the test and ends: under pytest-xdist the
worker exits (xdist reports the crash against that test and starts a fresh worker for the rest), in a single
process the session stops with its summary.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

from momkit.train.loop import device_lost

DEVICES = [pytest.param("cpu", marks=pytest.mark.interpret, id="interpret"),
           pytest.param("cuda", marks=pytest.mark.gpu, id="gpu")]


@pytest.fixture(params=DEVICES)
def device(request):
    """``cpu``: the Triton interpreter (marker ``interpret``); ``cuda``: a GPU (marker ``gpu``)."""
    if request.param == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the CPU interpreter runs where there is no CUDA device (TRITON_INTERPRET=1)")
    return request.param


def pytest_configure(config):
    config.addinivalue_line("markers", "xdist_group(name): tests that pytest-xdist runs on one worker")


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _device_memory(request):
    if not torch.cuda.is_available():
        yield
        return
    torch.cuda.reset_peak_memory_stats()
    yield
    lost = device_lost(torch.device("cuda"))
    if lost is not None:
        end_broken_process(request.node.nodeid, lost)
    peak = torch.cuda.max_memory_allocated() / 2**20
    request.node.user_properties.append(("peak_cuda_mib", round(peak, 1)))
    torch.cuda.empty_cache()


def end_broken_process(nodeid: str, why: str) -> None:
    message = (f"the CUDA context of this process no longer works after {nodeid} ({why}); every later test here "
               "would fail at its set-up")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        sys.stderr.write(f"\n{message}: ending this worker\n")
        sys.stderr.flush()
        os._exit(3)
    pytest.exit(message, returncode=3)
