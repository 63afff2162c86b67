"""Reading runs (metrics.jsonl, load over training, train_or_load) and the plot helpers."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from itertools import pairwise

import numpy as np
import pytest
import torch

from momkit import MoMConfig, MoMLayer
from momkit.analysis import (
    compare_capacity,
    crosstalk,
    heatmap,
    load_entropy,
    load_history,
    make_associations,
    metric_series,
    read_metrics,
    role_assignment,
    route,
    run_is_complete,
    train_or_load,
)
from momkit.config import load_config
from momkit.tasks import make_mqar

EVENTS = [
    {"step": 10, "split": "train", "loss": 3.0, "accuracy": 0.1, "router_entropy": 1.3, "elapsed_s": 1.0},
    {"step": 20, "split": "train", "loss": 2.0, "accuracy": 0.2, "router_entropy": 1.2, "elapsed_s": 2.0},
    {"step": 20, "split": "valid", "valid/accuracy": 0.25, "valid/load": [[0.5, 0.5], [0.9, 0.1]], "elapsed_s": 2.1},
    {"step": 40, "split": "valid", "valid/accuracy": 0.5, "valid/load": [[0.4, 0.6], [1.0, 0.0]], "elapsed_s": 4.1},
    {"step": 40, "event": "end", "stopped": "max_steps", "elapsed_s": 4.2},
]


def test_metrics_series_and_load_history(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in EVENTS))
    assert read_metrics(tmp_path) == EVENTS == read_metrics(tmp_path / "metrics.jsonl")
    steps, acc = metric_series(tmp_path, "valid/accuracy")
    assert steps.tolist() == [20, 40] and acc.tolist() == [0.25, 0.5]
    steps, ent = metric_series(EVENTS, "router_entropy", split="train")
    assert steps.tolist() == [10, 20] and ent.tolist() == [1.3, 1.2]
    steps, load = load_history(tmp_path)
    assert load.shape == (2, 2, 2) and load[1, 1, 0] == 1.0
    H = load_entropy(load)
    assert math.isclose(H[0, 0], math.log(2)) and H[1, 1] == 0.0
    with pytest.raises(FileNotFoundError):
        read_metrics(tmp_path / "nothing")
    with pytest.raises(ValueError, match="no valid/load"):
        load_history(EVENTS[:2])


TINY = [
    "run.progress=false", "model.hidden_size=16", "model.vocab_size=16", "model.num_layers=1",
    "model.mom.num_heads=2", "model.mom.num_memories=2", "model.mom.topk=1", "model.mom.chunk_size=8",
    "task.vocab_size=16", "task.train=[{num_examples: 32, seq_len: 12, num_kv_pairs: 2}]",
    "task.valid=[{num_examples: 16, seq_len: 12, num_kv_pairs: 2}]", "optim.batch_size=16", "optim.max_steps=4",
    "optim.warmup_steps=1", "run.eval_every=2", "run.log_every=2", "run.threads=1",
]


def test_train_or_load_reuses_only_the_same_finished_run(tmp_path):
    cfg = load_config("mqar_tiny", [*TINY, f"run.dir={tmp_path / 'run'}"])
    model, events = train_or_load(cfg)
    assert run_is_complete(tmp_path / "run") and events[-1]["event"] == "end"
    stamp = (tmp_path / "run" / "last.pt").stat().st_mtime_ns
    again, events2 = train_or_load(cfg)
    assert (tmp_path / "run" / "last.pt").stat().st_mtime_ns == stamp  # not trained again
    assert events2 == events
    same = load_config("mqar_tiny", [*TINY, f"run.dir={tmp_path / 'run'}", "run.threads=1", "run.progress=true"])
    train_or_load(same)  # execution settings do not change what is trained
    assert (tmp_path / "run" / "last.pt").stat().st_mtime_ns == stamp
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    changed = load_config("mqar_tiny", [*TINY, f"run.dir={tmp_path / 'run'}", "optim.max_steps=2"])
    _, events3 = train_or_load(changed)
    assert events3[-1]["step"] == 2  # a different config is trained, not reused
    _, events4 = train_or_load(changed, reuse=False)
    assert (tmp_path / "run" / "last.pt").stat().st_mtime_ns != stamp and events4[-1]["step"] == 2


def test_analysis_import_stays_light():
    code = ("import sys, momkit.analysis; heavy = [m for m in ('matplotlib', 'seaborn', 'pandas', 'optuna') "
            "if m in sys.modules]; print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=40)
    return buf.getvalue()


def test_plot_helpers_return_figures_that_render():
    from matplotlib.figure import Figure

    from momkit.analysis import plots

    torch.manual_seed(0)
    lay = MoMLayer(MoMConfig(hidden_size=16, num_heads=2, num_memories=3, topk=2, shared_memory=False)).eval()
    inputs, labels = make_mqar(2, 20, 32, 3, seed=0)
    plan = lay.route(torch.randn(2, 20, 16))
    from momkit.analysis import mqar_roles

    roles = mqar_roles(inputs, labels)
    a = make_associations(1, 12, 8, seed=0)
    idx = route(a, 3, "random")
    records = compare_capacity("linear_attn", [4, 8], 4, 2, trials=2)
    trials = [{"number": i, "state": "COMPLETE", "objective": 0.1 * i, "num_memories": m, "topk": k,
               "shared_memory": sh, "valid/load_imbalance": 0.05 * i}
              for i, (m, k, sh) in enumerate([(1, 1, True), (2, 1, False), (2, 2, True), (4, 2, False)])]
    curves = [{"number": n, "step": s, "value": 0.1 * n * s} for n in range(3) for s in (1, 2)]
    figs = [
        plots.plot_routing_heatmap(heatmap(plan, 0), tokens=inputs[0].tolist(), roles=roles[0]),
        plots.plot_routing_heatmap(heatmap(plan, 1)),
        plots.plot_load_history(np.array([1, 2]), np.array(EVENTS[2]["valid/load"] * 2).reshape(2, 2, 2)),
        plots.plot_series({"a": ([1, 2], [0.1, 0.2]), "b": ([1, 2], [0.3, 0.1])}, "accuracy", hline=0.5),
        plots.plot_role_assignment({"layer 0": role_assignment(plan, roles), "layer 1": role_assignment(plan, roles)}),
        plots.plot_matrix(torch.eye(3), ["a", "b", "c"], ["x", "y", "z"], title="m"),
        plots.plot_capacity(records, metric="error"),
        plots.plot_crosstalk(crosstalk("linear_attn", a.keys, a.values, idx, 3)[0], idx[0]),
        plots.plot_bars([{"rule": "a", "x": 1.0, "s": "u"}, {"rule": "b", "x": 2.0, "s": "v"}], "rule", "x", "s"),
        plots.plot_objective(trials, x="num_memories", hue="shared_memory", col="topk", title="t"),
        plots.plot_objective(trials, x="num_memories"),
        plots.plot_learning_curves(curves, label=lambda n: f"trial {n}"),
        plots.plot_scatter(trials, x="valid/load_imbalance", y="objective", hue="shared_memory"),
        plots.plot_importances({"num_memories": 0.7, "topk": 0.3}),
    ]
    for fig in figs:
        assert isinstance(fig, Figure) and fig.axes
        assert _png(fig)[:4] == b"\x89PNG"


def test_long_category_names_are_tilted_where_they_would_overlap():
    from matplotlib.figure import Figure

    from momkit.analysis.plots import tilt_clashing_labels

    def bars(names):
        fig = Figure(figsize=(5, 3))
        ax = fig.subplots()
        ax.bar(names, range(1, len(names) + 1))
        return fig, ax

    def overlap(ax):
        boxes = sorted((t.get_window_extent() for t in ax.get_xticklabels() if t.get_text()), key=lambda b: b.x0)
        return any(a.x1 > b.x0 for a, b in pairwise(boxes))

    long_names = ["learned_top2", "round_robin_top2", "hash_top2", "learned_top1_unnormalized", "learned_top1"]
    fig, ax = bars(long_names)
    fig.canvas.draw()
    assert overlap(ax)  # level, these names run into each other
    tilt_clashing_labels(fig)
    assert {t.get_rotation() for t in ax.get_xticklabels()} == {25.0}
    assert {t.get_horizontalalignment() for t in ax.get_xticklabels()} == {"right"}
    fig, ax = bars(["m1", "m2", "m4"])
    tilt_clashing_labels(fig)
    assert {t.get_rotation() for t in ax.get_xticklabels()} == {0.0}


def test_capacity_curves_that_coincide_stay_distinguishable():
    """Two setups with the same numbers (a mixture and an expanded memory at full recall): each line has its own
    marker and dash pattern, and they are drawn beside each other, not one on the other."""
    from momkit.analysis import plots

    records = [{"rule": "gla", "setup": s, "N": n, "accuracy": 1.0} for s in ("mixture", "expanded") for n in (8, 16)]
    fig = plots.plot_capacity(records)
    lines = [ln for ln in fig.axes[0].get_lines() if len(ln.get_xdata()) == 2]
    assert len(lines) == 2
    a, b = lines
    assert a.get_marker() != b.get_marker()
    assert a.get_linestyle() != b.get_linestyle()
    assert not np.allclose(a.get_xdata(), b.get_xdata())
