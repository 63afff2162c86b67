"""Packaging facts: the kernels folder is momkit.kernels only, import momkit stays light, tests poison memory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch


def test_kernels_are_a_momkit_subpackage_only(tmp_path):
    import momkit.kernels

    assert Path(momkit.kernels.__file__).parent.name == "kernels"
    # outside the source tree (so the checkout itself is not on sys.path), as a user imports it
    # (a package of the index called ``kernels``, which transformers needs, may be installed: it must be that one)
    code = ("import importlib.util, momkit.kernels; s = importlib.util.find_spec('kernels'); "
            "print(None if s is None else s.origin)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    ours = Path(momkit.kernels.__file__).resolve().parent
    found = out.stdout.strip()
    assert found == "None" or ours not in Path(found).resolve().parents, \
        f"this repository's kernels/ must not be a top-level 'kernels' import name; found {found}"


def test_import_momkit_is_light(tmp_path):
    code = (
        "import sys, momkit, momkit.rules; "
        "heavy = [m for m in ('triton', 'optuna', 'seaborn', 'pandas', 'omegaconf', 'momkit.kernels') "
        "if m in sys.modules]; print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import momkit pulled in {out.stdout.strip()}"


def test_fresh_allocations_are_poisoned_in_tests():
    assert torch.isnan(torch.empty(16)).all()
    assert torch.isnan(torch.empty_like(torch.zeros(4, 4))).all()


def test_editable_install_prints_no_setuptools_warnings(tmp_path):
    """`pip install -e .` as a user runs it (isolated build), into a throwaway environment: setuptools has
    nothing to warn about (license metadata, package data, the editable layout)."""
    import re

    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "env")], check=True)
    out = subprocess.run([sys.executable, "-m", "pip", "--python", str(tmp_path / "env" / "bin" / "python"),
                          "install", "--no-deps", "-e", str(root)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    warned = [ln for ln in (out.stdout + out.stderr).splitlines() if re.search(r"[a-z]Warning\b", ln)]
    assert warned == [], "\n".join(warned)


def _lab_command(*make_vars: str) -> str:
    """The command line `make lab` would start JupyterLab with (make -n prints it without running anything)."""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(["make", "-n", "-C", str(root), "lab", "VENV=/nonexistent/venv", *make_vars],
                         capture_output=True, text=True, check=True)
    return next(ln for ln in out.stdout.splitlines() if "jupyter lab" in ln)


def test_make_lab_allows_root_only_as_root():
    import os

    assert _lab_command("USER_ID=0").split()[-1] == "--allow-root"
    assert "--allow-root" not in _lab_command("USER_ID=1000")
    assert ("--allow-root" in _lab_command()) == (os.geteuid() == 0)  # the user running the tests
    # and JupyterLab (the notebooks extra) knows the flag
    help_all = subprocess.run([str(Path(sys.executable).parent / "jupyter"), "lab", "--help-all"],
                              capture_output=True, text=True, check=True).stdout
    assert "--allow-root" in help_all
