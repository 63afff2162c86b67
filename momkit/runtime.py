"""Process-level settings that make PyTorch fast on a CPU, applied only when asked for.

``tune_cpu()`` applies both of the following; the ``momkit`` command and sweep workers call it first
thing (before any tensor work, so that PyTorch's worker threads inherit the floating-point mode).

``tune_cpu_allocator()``: glibc returns freed memory at the top of the heap to the system whenever
more than ``M_TRIM_THRESHOLD`` is free, so a program that repeatedly allocates and frees tensors
of a few MB (every chunked rule, every training step) page-faults the same memory back in on each
call; on a virtual machine that can double a CPU step's time. Raising the trim and mmap thresholds
keeps that memory in the process, which is what jemalloc or tcmalloc would do. momkit never calls
this at import; its command line and benchmarks call it explicitly and record that they did.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_applied = False


def tune_cpu_allocator(trim_threshold: int = 1 << 30, mmap_threshold: int = 32 << 20) -> bool:
    """Raise glibc's trim and mmap thresholds for this process. Returns whether it applied
    (False where the C library is not glibc, e.g. on macOS)."""
    global _applied
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold)) and bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold))
    _applied = _applied or ok
    return ok


def flush_denormals() -> bool:
    """Flush denormal floats to zero (``torch.set_flush_denormal(True)``). x86 CPUs compute on denormal
    numbers (below 1.2e-38 in float32) up to 100x slower; decaying memories produce them (products of
    small decay factors), which was seen to slow a CPU training step 80x. Results change only below
    1.2e-38. Threads started before the call keep their own mode, so call it before any tensor work."""
    import torch

    return bool(torch.set_flush_denormal(True))


def tune_cpu() -> dict[str, bool]:
    """``tune_cpu_allocator()`` and ``flush_denormals()``; returns which applied."""
    return {"allocator": tune_cpu_allocator(), "flush_denormals": flush_denormals()}


def cpu_allocator_tuned() -> bool:
    """Whether ``tune_cpu_allocator`` has been applied in this process."""
    return _applied
