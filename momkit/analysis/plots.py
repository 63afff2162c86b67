"""Plot helpers: each takes the data of one analysis and returns a ``matplotlib.figure.Figure``.

matplotlib, seaborn and pandas are imported inside the functions (``import momkit`` stays light). The
figures are not registered with pyplot, so a notebook shows a returned figure once, and nothing global
changes. Records (lists of dicts) are what ``momkit.analysis`` returns; they become DataFrames here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import pairwise

import numpy as np

from momkit.analysis.routing import ROLES

ROLE_COLORS = {"key": "#4c72b0", "value": "#dd8452", "query": "#55a868", "filler": "#d3d3d3"}


def _figure(nrows: int = 1, ncols: int = 1, size: tuple[float, float] = (6.0, 3.5), **kw):
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def tilt_clashing_labels(fig, rotation: float = 25.0) -> None:
    """Tilts the x tick labels of every axis of ``fig`` whose labels, side by side, would overlap (long names of
    categories such as a protocol's layouts); labels that fit stay level."""
    fig.canvas.draw()  # lays the tick labels out, so their extents are known
    for ax in fig.axes:
        labels = [t for t in ax.get_xticklabels() if t.get_text()]
        boxes = sorted((t.get_window_extent() for t in labels), key=lambda b: b.x0)
        if any(a.x1 > b.x0 for a, b in pairwise(boxes)):
            for t in labels:
                t.set_rotation(rotation)
                t.set_horizontalalignment("right")
                t.set_rotation_mode("anchor")


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _frame(records):
    import pandas as pd

    return records if isinstance(records, pd.DataFrame) else pd.DataFrame(list(records))


# ----------------------------------------------------------------------------------------- routing
def plot_routing_heatmap(weights, tokens: Sequence | None = None, roles=None, title: str = "routing weights",
                         memory_names: Sequence[str] | None = None):
    """Heatmap of a ``[T, M]`` routing table (``momkit.analysis.heatmap``): memories as rows, positions as
    columns; ``tokens`` label the columns and ``roles`` (``[T]`` role codes) colour a strip under them."""
    import seaborn as sns
    from matplotlib.colors import ListedColormap

    W = _np(weights).T  # [M, T]
    M, T = W.shape
    has_roles = roles is not None
    fig, axes = _figure(2 if has_roles else 1, 1, (max(6.0, 0.22 * T + 1.5), 0.45 * M + (1.9 if has_roles else 1.4)),
                        gridspec_kw={"height_ratios": [M, 0.6]} if has_roles else None, sharex=True)
    ax = axes[0, 0]
    sns.heatmap(W, ax=ax, vmin=0, vmax=1, cmap="viridis", cbar_kws={"label": "weight", "pad": 0.01},
                yticklabels=memory_names or [str(m) for m in range(M)])
    ax.set_ylabel("memory")
    ax.set_title(title)
    bottom = ax
    if has_roles:
        rax = axes[1, 0]
        r = _np(roles)[None]
        cmap = ListedColormap([ROLE_COLORS[n] for n in ROLES])
        rax.imshow(r, aspect="auto", cmap=cmap, vmin=-0.5, vmax=len(ROLES) - 0.5, interpolation="nearest",
                   extent=(0, T, 1, 0))
        rax.set_yticks([])
        handles = [_patch(ROLE_COLORS[n], n) for n in ROLES]
        rax.legend(handles=handles, ncol=len(ROLES), loc="upper center", bbox_to_anchor=(0.5, -0.9), frameon=False,
                   fontsize=8)
        bottom = rax
    bottom.set_xticks(np.arange(T) + 0.5)
    bottom.set_xticklabels([str(t) for t in tokens] if tokens is not None else [str(t) for t in range(T)],
                           rotation=90, fontsize=7)
    bottom.set_xlabel("position (token)" if tokens is not None else "position")
    return fig


def _patch(color: str, label: str):
    from matplotlib.patches import Patch

    return Patch(color=color, label=label)


def plot_load_history(steps, load, title: str = "load per memory over training"):
    """Lines of each memory's load (``[S, layers, M]`` from ``load_history``), one panel per layer, with the
    balanced load ``1/M`` dashed."""
    load = _np(load)
    _, L, M = load.shape
    fig, axes = _figure(1, L, (3.6 * L, 3.0), sharey=True)
    for li in range(L):
        ax = axes[0, li]
        for m in range(M):
            ax.plot(_np(steps), load[:, li, m], label=f"memory {m}")
        ax.axhline(1 / M, color="gray", ls="--", lw=1)
        ax.set_title(f"layer {li}")
        ax.set_xlabel("step")
    axes[0, 0].set_ylabel("fraction of slots")
    axes[0, -1].legend(fontsize=8)
    fig.suptitle(title)
    return fig


def plot_series(series: Mapping[str, tuple], ylabel: str, title: str = "", hline: float | None = None,
                xlabel: str = "step"):
    """Several ``(steps, values)`` curves on one axis, labelled by the mapping's keys."""
    fig, axes = _figure(1, 1, (5.5, 3.2))
    ax = axes[0, 0]
    for name, (x, y) in series.items():
        ax.plot(_np(x), _np(y), marker=".", label=name)
    if hline is not None:
        ax.axhline(hline, color="gray", ls="--", lw=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(series) > 1:
        ax.legend(fontsize=8)
    return fig


def plot_lines(records, x: str, y: str, hue: str | None = None, style: str | None = None, title: str = "",
               ylabel: str | None = None, logx: bool = False, size: tuple[float, float] = (7.0, 3.6)):
    """Lines of ``y`` against ``x`` from records, a colour per ``hue`` value and a dash per ``style`` value
    (e.g. accuracy over training per variant and seed), legend outside the axes."""
    import seaborn as sns

    df = _frame(records)
    fig, axes = _figure(1, 1, size)
    ax = axes[0, 0]
    sns.lineplot(data=df, x=x, y=y, hue=hue, style=style, ax=ax, estimator=None,
                 units=style if style else None, marker="." if len(df) < 400 else None)
    if logx:
        ax.set_xscale("log", base=2)
    if ax.get_legend() is not None:
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    ax.set_title(title)
    ax.set_ylabel(ylabel or y)
    return fig


def plot_matrix(matrix, row_labels: Sequence[str], col_labels: Sequence[str], title: str = "", fmt: str = ".2f",
                cmap: str = "mako", vmin: float | None = None, vmax: float | None = None, xlabel: str = "",
                ylabel: str = "", ax=None, cbar: bool = True):
    """An annotated heatmap (role x memory tables, co-selection, state similarity)."""
    import seaborn as sns

    A = _np(matrix).astype(float)
    fig = None
    if ax is None:
        fig, axes = _figure(1, 1, (0.7 * A.shape[1] + 2.2, 0.45 * A.shape[0] + 1.4))
        ax = axes[0, 0]
    sns.heatmap(A, ax=ax, annot=True, fmt=fmt, cmap=cmap, vmin=vmin, vmax=vmax, cbar=cbar,
                xticklabels=list(col_labels), yticklabels=list(row_labels), annot_kws={"fontsize": 8})
    ax.tick_params(axis="y", labelrotation=0)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return fig if fig is not None else ax.figure


def plot_role_assignment(tables: Mapping[str, object], title: str = "where each MQAR role goes"):
    """One ``[R, M]`` table (``role_assignment``) per panel, e.g. one per layer or per router."""
    n = len(tables)
    M = _np(next(iter(tables.values()))).shape[1]
    fig, axes = _figure(1, n, ((0.6 * M + 1.6) * n + 0.8, 2.8))
    for ax, (name, table) in zip(axes[0], tables.items()):
        plot_matrix(table, ROLES, [str(m) for m in range(M)], title=name, vmin=0, vmax=1, xlabel="memory",
                    ax=ax, cbar=False)
    fig.suptitle(title)
    return fig


# ----------------------------------------------------------------------------------------- capacity
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">")
DASHES = ("", (4, 2), (1, 1.5), (6, 2, 1, 2), (2, 2), (8, 3), (3, 1, 1, 1))


def plot_capacity(records, metric: str = "accuracy", hue: str = "setup", col: str = "rule", col_wrap: int = 4,
                  title: str = "", logx: bool = True, dodge: float = 0.04):
    """``metric`` against N (``compare_capacity`` / ``capacity_curve`` records), one panel per ``col``
    value, one line per ``hue`` value. Every line has its own colour, marker and dash pattern, and is drawn
    ``dodge`` (a fraction of N, on the log axis) beside the others, so that curves that coincide (a mixture
    and an expanded memory that both recall everything) stay visible."""
    import seaborn as sns

    df = _frame(records)
    cols = list(dict.fromkeys(df[col])) if col else [None]
    ncols = min(col_wrap, len(cols))
    nrows = -(-len(cols) // ncols)
    hues = list(dict.fromkeys(df[hue]))
    if logx and dodge:
        shift = {h: (1 + dodge) ** (i - (len(hues) - 1) / 2) for i, h in enumerate(hues)}
        df = df.assign(N=df["N"] * df[hue].map(shift))
    styles = {"style": hue, "style_order": hues, "markers": list(MARKERS[: len(hues)]) if len(hues) <= len(MARKERS)
              else True, "dashes": list(DASHES[: len(hues)]) if len(hues) <= len(DASHES) else True}
    per_row = 4 if ncols > 1 else 2  # legend entries per row
    fig, axes = _figure(nrows, ncols, (max(3.1 * ncols + 0.4, 6.0),
                                       2.6 * nrows + 0.5 + 0.22 * -(-len(hues) // per_row)), sharey=True)
    for i, ax in enumerate(axes.flat):
        if i >= len(cols):
            ax.set_visible(False)
            continue
        part = df if cols[i] is None else df[df[col] == cols[i]]
        sns.lineplot(data=part, x="N", y=metric, hue=hue, hue_order=hues, ax=ax, legend=i == 0, markersize=5,
                     **styles)
        if logx:
            ax.set_xscale("log", base=2)
        if cols[i] is not None:
            ax.set_title(str(cols[i]))
    first = axes.flat[0]
    if first.get_legend() is not None:  # one legend for the figure, outside the panels
        handles, labels = first.get_legend_handles_labels()
        first.get_legend().remove()
        fig.legend(handles, labels, title=hue, loc="outside lower center", ncol=min(len(labels), per_row),
                   fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def plot_crosstalk(X, assignment=None, title: str = "cross-talk |r_i - r_i^(-j)| / |v_i|", vmax: float | None = None,
                   ax=None):
    """One trial's ``[N, N]`` cross-talk matrix, associations sorted by memory (lines between memories)."""
    import seaborn as sns

    A = _np(X).astype(float)
    N = A.shape[0]
    order = np.arange(N)
    bounds = []
    if assignment is not None:
        a = _np(assignment)
        a = a[:, 0] if a.ndim == 2 else a
        order = np.argsort(a, kind="stable")
        bounds = np.flatnonzero(np.diff(a[order])) + 1
    A = A[order][:, order]
    fig = None
    if ax is None:
        fig, axes = _figure(1, 1, (4.2, 3.6))
        ax = axes[0, 0]
    sns.heatmap(A, ax=ax, cmap="rocket_r", vmin=0, vmax=vmax, xticklabels=False, yticklabels=False,
                cbar_kws={"pad": 0.01})
    for b in bounds:
        ax.axhline(b, color="tab:blue", lw=0.8)
        ax.axvline(b, color="tab:blue", lw=0.8)
    ax.set_xlabel("written association j")
    ax.set_ylabel("read association i")
    ax.set_title(title, fontsize=9)
    return fig if fig is not None else ax.figure


def plot_bars(records, x: str, y: str, hue: str | None = None, title: str = "", ylabel: str | None = None,
              hline: float | None = None, size: tuple[float, float] = (6.0, 3.2), logy: bool = False):
    """A seaborn bar plot of records (e.g. cross-talk by rule and setup, accuracy change by memory)."""
    import seaborn as sns

    df = _frame(records)
    fig, axes = _figure(1, 1, size)
    ax = axes[0, 0]
    sns.barplot(data=df, x=x, y=y, hue=hue, ax=ax)
    if hline is not None:
        ax.axhline(hline, color="gray", lw=1)
    if logy:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_ylabel(ylabel or y)
    ax.tick_params(axis="x", labelrotation=30)
    return fig


# ----------------------------------------------------------------------------------------- sweeps
def plot_objective(trials, x: str, y: str = "objective", hue: str | None = None, col: str | None = None,
                   title: str = "", ylabel: str | None = None):
    """A sweep's objective against one parameter (complete trials), a panel per value of ``col``, a colour per
    value of ``hue``; every trial a dot, lines through the per-value means."""
    import seaborn as sns

    df = _frame(trials)
    df = df[df["state"] == "COMPLETE"] if "state" in df else df
    cols = sorted(df[col].dropna().unique(), key=str) if col else [None]
    fig, axes = _figure(1, len(cols), (3.4 * len(cols) + 0.6, 3.4), sharey=True)
    order = sorted(df[x].dropna().unique(), key=lambda v: (isinstance(v, str), v))
    hue_order = sorted(df[hue].dropna().unique(), key=str) if hue else None
    for i, (ax, c) in enumerate(zip(axes[0], cols)):
        part = df if c is None else df[df[col] == c]
        sns.pointplot(data=part, x=x, y=y, hue=hue, order=order, hue_order=hue_order, ax=ax, errorbar=None,
                      dodge=0.2 if hue else False, legend=i == 0, markers="o", linestyles="-")
        dots = {"hue": hue, "hue_order": hue_order} if hue else {"color": "gray"}
        sns.stripplot(data=part, x=x, y=y, order=order, ax=ax, dodge=bool(hue), legend=False, alpha=0.5, size=4,
                      **dots)
        ax.set_title(f"{col} = {c}" if col else "")
        ax.set_ylabel(ylabel or y)
    first = axes[0, 0]
    if first.get_legend() is not None:
        handles, labels = first.get_legend_handles_labels()
        first.get_legend().remove()
        fig.legend(handles[: len(hue_order)], labels[: len(hue_order)], title=hue, loc="outside lower center",
                   ncol=len(hue_order), fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def plot_importances(importances: Mapping[str, float], title: str = "parameter importances"):
    """Horizontal bars of parameter importances (name -> share), largest on top."""
    items = sorted(importances.items(), key=lambda kv: kv[1])
    fig, axes = _figure(1, 1, (5.0, 0.4 * max(len(items), 1) + 1.2))
    ax = axes[0, 0]
    ax.barh([k for k, _ in items], [v for _, v in items], color="#4c72b0")
    ax.set_xlabel("importance")
    ax.set_title(title)
    return fig


def plot_learning_curves(curves, label=None, title: str = "objective at each evaluation", ylabel: str = "objective"):
    """One line per trial from ``learning_curves`` rows (``number``, ``step``, ``value``); ``label`` maps a trial
    number to its legend text (default: the number)."""
    df = _frame(curves)
    fig, axes = _figure(1, 1, (6.4, 3.2 + 0.12 * df["number"].nunique()))
    ax = axes[0, 0]
    for number, part in df.groupby("number"):
        part = part.sort_values("step")
        ax.plot(part["step"], part["value"], marker=".", label=label(number) if label else str(number))
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(df):
        fig.legend(loc="outside lower center", ncol=2, fontsize=7)
    return fig


def plot_scatter(records, x: str, y: str, hue: str | None = None, title: str = "", xlabel: str | None = None,
                 ylabel: str | None = None):
    """A seaborn scatter plot of records (e.g. a sweep's objective against its routing telemetry)."""
    import seaborn as sns

    df = _frame(records)
    fig, axes = _figure(1, 1, (5.8, 3.4))
    ax = axes[0, 0]
    sns.scatterplot(data=df, x=x, y=y, hue=hue, ax=ax, s=50)
    if ax.get_legend() is not None:
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, title=hue)
    ax.set_title(title)
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    return fig
