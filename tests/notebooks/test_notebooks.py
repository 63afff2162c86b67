"""Every notebook in notebooks/ runs headless, top to bottom, in its small mode; the committed ones carry
the outputs of a full run.

The notebooks read ``MOMKIT_NOTEBOOK_SMALL=1`` in their parameter cell and shrink every size (training
steps, data, capacity grids); runs and sweep storages go to a temporary directory
(``MOMKIT_NOTEBOOK_RUNS``), and torch uses one thread (``MOMKIT_NOTEBOOK_THREADS``: pytest-xdist already
runs one process per core). Any cell error fails the test. The committed notebooks keep the outputs of
a full run; this test never writes them back.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
NAMES = sorted(p.name for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
MIN_DPI = 150  # the committed figures' resolution
DPI = re.compile(r"""plt\.rcParams\[\s*["']figure\.dpi["']\s*\]\s*=\s*([0-9.]+)""")


def test_the_four_notebooks_exist():
    assert NAMES == ["01_quickstart.ipynb", "02_routing.ipynb", "03_interference.ipynb", "04_sweep_analysis.ipynb"]


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebooks_carry_the_figures_of_a_full_run(name):
    path = NOTEBOOKS / name
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code), f"{name} is committed without running every cell"
    outputs = [o for c in code for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"], f"{name} is committed with an error"
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2, f"{name} is committed without its figures"
    assert path.stat().st_size < 1_500_000, f"{name} is {path.stat().st_size / 1e6:.1f} MB: lower the figures' dpi"
    dpi = [m.group(1) for c in code for m in DPI.finditer(c.source)]
    assert dpi and min(map(float, dpi)) >= MIN_DPI, (
        f"{name} sets the figure dpi to {', '.join(dpi) or 'nothing'}: its code must set "
        f"plt.rcParams[\"figure.dpi\"] to {MIN_DPI} or more")


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_in_small_mode(name, tmp_path, monkeypatch):
    monkeypatch.setenv("MOMKIT_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("MOMKIT_NOTEBOOK_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("MOMKIT_NOTEBOOK_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert nb.cells[0].cell_type == "markdown" and nb.cells[-1].cell_type == "markdown", \
        "a notebook starts with the question it answers and ends with what its figures show"
    assert any("parameters" in c.metadata.get("tags", []) for c in nb.cells), "no parameter cell"
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError, naming the cell, on any error
    elapsed = time.perf_counter() - start
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert figures, f"{name} produced no figure"
    print(f"{name}: {elapsed:.1f} s")
