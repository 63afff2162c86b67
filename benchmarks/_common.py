"""Helpers shared by the benchmarks: the environment record written with every result, and the
checks of their command-line arguments."""

from __future__ import annotations

import argparse
import os
import platform
import subprocess

import torch


def environment(commit: str | None = None, fla: bool = False) -> dict:
    """Device, library versions and commit (``commit``, where given, overrides the checkout's: on the
    device machine the copy's git metadata is not the tree's), recorded with every result; with ``fla``,
    fla's version (None where it is not installed)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(__file__), check=False).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=os.path.dirname(__file__), check=False).stdout.strip()
    except OSError:
        head, dirty = "", ""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    env = {"device": device, "torch": torch.__version__, "triton": triton_version,
           "python": platform.python_version(), "commit": commit or (head + ("+dirty" if dirty else ""))}
    if fla:
        try:
            import fla as fla_module

            env["fla"] = fla_module.__version__
        except ImportError:
            env["fla"] = None
    launch = os.environ.get("MOMKIT_LAUNCH", "").strip()
    if launch:  # launch options other than the launchers' defaults (momkit.kernels._common.LAUNCH)
        env["launch"] = launch
    return env


def name_list(ap: argparse.ArgumentParser, option: str, value: str, allowed) -> list[str]:
    """The names of a comma-separated option, each one of ``allowed``; otherwise one argparse error
    naming the option, the value and what is allowed."""
    allowed = list(allowed)
    names = [n for n in value.split(",") if n]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        ap.error(f"{option} {value!r}: {'unknown ' + ', '.join(bad) if bad else 'no names'}; "
                 f"allowed: {', '.join(allowed)}")
    return names


def size_list(ap: argparse.ArgumentParser, option: str, value: str, lengths: tuple[int, ...], what: str,
              example: str, one: bool = False) -> list[tuple[int, ...]]:
    """The sizes of a comma-separated option such as ``4x2048x4x256x256,1x8192x4x256x256``: each ``lengths``
    positive integers joined by ``x`` (exactly one size with ``one``); otherwise one argparse error naming the
    option, the value, what is expected (``what``) and an example."""
    sizes = [item.split("x") for item in value.split(",")]
    if (one and len(sizes) != 1) or any(len(p) not in lengths or not all(x.isdigit() and int(x) > 0 for x in p)
                                        for p in sizes):
        ap.error(f"{option} {value!r}: expected {what}, e.g. {example}")
    return [tuple(int(x) for x in p) for p in sizes]
