"""Helpers shared by the benchmarks: the environment record written with every result."""

from __future__ import annotations

import os
import platform
import subprocess

import torch


def environment() -> dict:
    """Device, library versions and commit, recorded with every result."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(__file__), check=False).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=os.path.dirname(__file__), check=False).stdout.strip()
    except OSError:
        commit, dirty = "", ""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return {"device": device, "torch": torch.__version__, "triton": triton_version,
            "python": platform.python_version(), "commit": commit + ("+dirty" if dirty else "")}
