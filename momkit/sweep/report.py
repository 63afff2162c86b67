"""``momkit sweep-report``: every trial of a study as a table, files and figures, read from the storage alone.

Writes into ``--out`` (default ``<runs_dir>/<study>/report``):

* ``trials.csv``, ``trials.parquet`` — one row per trial: number, state, objective (mean over seeds) and its
  standard deviation, the searched parameters, the main config values (rule, num_memories, topk,
  shared_memory, router, aux_loss_scale, lr, ...), the evaluation metrics with the routing telemetry
  (``valid/load_imbalance``, ``valid/router_entropy``, ``valid/dead_memories``, ...), steps, times, worker,
  run directory, retry links and the error message of failed trials;
* figures (seaborn, 150 dpi): ``objective_vs_num_memories.png`` (faceted by topk, hue shared memory, a row per
  rule), ``objective_by_<name>.png`` for a searched parameter of named values (a bundle: bars per rule and value,
  the best of the other searched parameters in each, with the 95 % interval over seeds),
  ``objective_by_rule.png`` (without such a parameter), ``objective_by_router.png`` (where those vary),
  ``param_importances.png`` (the
  share of the objective's variance each parameter explains alone) and ``learning_curves.png`` (the pruner's view,
  coloured by the swept parameters);
* ``best_config.yaml`` — the best trial's resolved config, ready for ``momkit train``;
* ``claims.csv``, ``claims.md``, ``claims.png`` — where the spec lists a paper's claims, each one's verdict
  from the seeds and both sides with their intervals (``momkit.sweep.verdicts``). With ``--pool OTHER ...`` the
  claims are judged on the complete trials of the other studies in the same storage as well (``pool_trials``):
  a control that widens a grid (a learning rate the first study did not try) then counts for each side's best.

Where a cell (e.g. one num_memories x topk x shared memory) has several trials because other parameters
(a learning rate) were searched too, the figures show the best trial of the cell, with the spread over its
seeds.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from momkit.config import ConfigError
from momkit.sweep.progress import fmt_value, short_names
from momkit.sweep.runner import BUDGET_ATTR, CLAIMS_ATTR, RUNS_DIR_ATTR, SPEC_ATTR, _optuna
from momkit.sweep.storage import DEFAULT_STORAGE, describe, open_storage, retried_as, study_names

# config values every row carries (short name -> dotted key), whether searched or not
CONFIG_COLUMNS = {
    "mixer": "model.mixer", "rule": "model.mom.rule", "num_memories": "model.mom.num_memories",
    "topk": "model.mom.topk", "shared_memory": "model.mom.shared_memory", "router": "model.mom.router",
    "aux_loss_scale": "model.mom.aux_loss_scale", "lr": "optim.lr", "hidden_size": "model.hidden_size",
    "num_layers": "model.num_layers", "max_steps": "optim.max_steps",
}
STATE_ORDER = {"COMPLETE": 0, "PRUNED": 1, "SKIPPED": 2, "FAIL": 3, "RUNNING": 4, "WAITING": 5}
FIGURE_DPI = 150


@dataclass
class Report:
    study: str
    out_dir: Path
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what could not be drawn or written, and why
    effects: dict[str, float] = field(default_factory=dict)  # main_effects of the searched parameters
    table: str = ""
    verdicts: list[dict] = field(default_factory=list)  # the spec's claims judged (momkit.sweep.verdicts)


def param_column(name: str) -> str:
    """The column of a searched parameter: its name, unless a config column has that name (a bundle called
    ``router``), then ``<name> (param)``."""
    return f"{name} (param)" if name in CONFIG_COLUMNS else name


def _lookup(tree: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def load_study(study_name: str, storage_url: str | None = None):
    """The study, read-only: a missing SQLite or journal file is an error, never created."""
    optuna = _optuna()
    storage_url = storage_url or DEFAULT_STORAGE
    storage = open_storage(storage_url, create=False)
    names = study_names(storage)
    if study_name not in names:
        raise ConfigError(f"no study {study_name!r} in {describe(storage_url)} (studies there: "
                          f"{', '.join(names) or 'none'})")
    return optuna.load_study(study_name=study_name, storage=storage)


def trials_frame(study):
    """One row per trial (see the module docstring); pandas DataFrame."""
    import pandas as pd
    import yaml

    fp = study.user_attrs.get(SPEC_ATTR, {})
    space = list(fp.get("space", {}))
    trials = study.get_trials(deepcopy=False)
    replaced_by = retried_as(trials)
    rows = []
    for t in trials:
        # a queued retry carries the attributes of the trial it replaces until it runs: not its own outcome
        ua = {} if t.state.name == "WAITING" else t.user_attrs
        state = "SKIPPED" if ua.get("skipped") else t.state.name
        row: dict[str, Any] = {"number": t.number, "state": state,
                               "objective": t.value if t.state.name == "COMPLETE" else None,
                               "objective_std": ua.get("objective_std") if t.state.name == "COMPLETE" else None,
                               "seeds": len(ua.get("seeds") or []) or None}
        for name in space:
            row[param_column(name)] = t.params.get(name)
        cfg = yaml.safe_load(ua["config"]) if ua.get("config") else {}
        for short, key in CONFIG_COLUMNS.items():
            row[short] = _lookup(cfg, key)
        for key, val in (ua.get("metrics") or {}).items():  # "step": the training step of that evaluation
            row["eval_step" if key == "step" else key] = json.dumps(val) if isinstance(val, (list, dict)) else val
        steps = ua.get("steps") or []
        row["steps"] = max(steps) if steps else None
        row["stopped"] = ",".join(ua.get("stopped") or []) or None
        row["train_s"] = ua.get("train_s")
        row["duration_s"] = ((t.datetime_complete - t.datetime_start).total_seconds()
                             if t.datetime_complete and t.datetime_start else None)
        row["datetime_start"] = t.datetime_start.isoformat() if t.datetime_start else None
        row["datetime_complete"] = t.datetime_complete.isoformat() if t.datetime_complete else None
        row["last_step"] = max(t.intermediate_values) if t.intermediate_values else None
        row["intermediate"] = json.dumps({str(k): v for k, v in sorted(t.intermediate_values.items())}) \
            if t.intermediate_values else None
        row["objective_per_seed"] = json.dumps(ua["objective_per_seed"]) if ua.get("objective_per_seed") else None
        row["worker"] = ua.get("worker")
        row["device"] = ua.get("device")
        row["run_dir"] = ua.get("run_dir")
        row["retry_of"] = ua.get("retry_of", t.system_attrs.get("failed_trial"))
        row["retried_as"] = replaced_by.get(t.number)
        error = ua.get("error") or ua.get("skipped") or ua.get("pruned")
        if t.state.name == "FAIL" and not error:
            error = "worker died (no heartbeat)"
        row["message"] = error
        rows.append(row)
    df = pd.DataFrame(rows)
    return _arrow_safe(df)


def _arrow_safe(df):
    """Columns that mix Python types (a categorical of numbers and strings) become strings, so the frame
    writes to Parquet; numbers stay numbers."""
    for col in df.columns:
        if df[col].dtype == object:
            kinds = {type(v) for v in df[col] if v is not None and not (isinstance(v, float) and math.isnan(v))}
            if len(kinds) > 1 and not kinds <= {int, float}:
                df[col] = df[col].map(lambda v: None if v is None else str(v))
    return df


def _display_frame(df, metric: str, direction: str, space: list[str]):
    import pandas as pd

    names = short_names(space)
    show = pd.DataFrame({"trial": df["number"], "state": df["state"]})
    seeds = df["seeds"].max() if "seeds" in df and df["seeds"].notna().any() else 1
    obj = []
    for val, std in zip(df["objective"], df["objective_std"]):
        if val is None or (isinstance(val, float) and math.isnan(val)):
            obj.append("")
        else:
            obj.append(f"{val:.4f}" + (f" ± {std:.4f}" if seeds and seeds > 1 and std == std else ""))
    show[metric] = obj
    for name in space:
        show[names[name]] = df[name].map(lambda v: "" if v is None or v != v else
                                         (f"{v:.3g}" if isinstance(v, float) else str(v)))
    show["steps"] = df["steps"].map(lambda v: "" if v is None or v != v else str(int(v)))
    show["time_s"] = df["duration_s"].map(lambda v: "" if v is None or v != v else f"{v:.0f}")
    key_state = df["state"].map(STATE_ORDER).fillna(9)
    sign = -1 if direction == "maximize" else 1
    key_obj = df["objective"].map(lambda v: sign * v if v is not None and v == v else math.inf)
    order = sorted(range(len(df)), key=lambda i: (key_state.iloc[i], key_obj.iloc[i], df["number"].iloc[i]))
    return show.iloc[order]


def _best_per_cell(df, cells: list[str], direction: str):
    complete = df[df["state"] == "COMPLETE"].dropna(subset=["objective"])
    if complete.empty:
        return complete
    idx = (complete.groupby(cells, dropna=False)["objective"].idxmax() if direction == "maximize"
           else complete.groupby(cells, dropna=False)["objective"].idxmin())
    return complete.loc[idx.values]


def _per_seed(df, metric: str):
    """One row per (trial, seed): the seed's objective under ``metric`` (for spread over seeds)."""
    import pandas as pd

    rows = []
    for _, r in df.iterrows():
        values = json.loads(r["objective_per_seed"]) if isinstance(r.get("objective_per_seed"), str) else \
            [r["objective"]]
        for v in values:
            rows.append({**r.to_dict(), metric: v})
    return pd.DataFrame(rows)


def main_effects(df, space: list[str]) -> dict[str, float]:
    """For each searched parameter, the share of the objective's variance over complete trials that its main
    effect explains (eta squared: the variance of the per-value means over the total variance). A parameter
    needs about two trials per value: numeric ones with more values are binned by quantiles (at most 4 bins),
    categorical ones are left out. Interactions are not counted, so the shares need not sum to one. Empty with
    fewer than 3 complete trials or a constant objective."""
    import pandas as pd

    complete = df[df["state"] == "COMPLETE"].dropna(subset=["objective"])
    y = complete["objective"].astype(float)
    if len(complete) < 3 or y.var(ddof=0) <= 0:
        return {}
    out = {}
    n = len(complete)
    for name in space:
        x = complete[name]
        if x.nunique(dropna=False) < 2:
            continue
        if x.nunique(dropna=False) > n // 2:  # values of one trial each explain everything: meaningless
            if not pd.api.types.is_numeric_dtype(x) or n < 4:
                continue
            x = pd.qcut(x.astype(float), min(4, n // 2), duplicates="drop")
        means = y.groupby(x.astype(str)).transform("mean")
        out[name] = float(((means - y.mean()) ** 2).mean() / y.var(ddof=0))
    return out


def _figures(df, study, metric: str, direction: str, space: list[str], out_dir: Path, report: Report) -> None:
    import matplotlib.pyplot as plt  # the backend is the caller's (the command line uses Agg)
    import numpy as np
    import seaborn as sns

    from momkit.analysis.plots import tilt_clashing_labels

    sns.set_theme(style="whitegrid", context="notebook")
    complete = df[df["state"] == "COMPLETE"]
    seeds = int(df["seeds"].max()) if df["seeds"].notna().any() else 1
    errorbar = "sd" if seeds > 1 else None
    spread = f" (mean ± sd over {seeds} seeds)" if seeds > 1 else ""

    def varies(col: str) -> bool:
        return col in complete and complete[col].nunique(dropna=True) >= 2

    def save(grid_or_fig, name: str, title: str) -> None:
        fig = grid_or_fig.figure if hasattr(grid_or_fig, "figure") else grid_or_fig
        fig.suptitle(title, y=1.02 + 0.06 * title.count("\n"))  # a second line clears the axes too
        tilt_clashing_labels(fig)
        path = out_dir / name
        fig.savefig(path, dpi=FIGURE_DPI, bbox_inches="tight")
        plt.close(fig)
        report.files.append(path)

    cell_keys = ["rule", "num_memories", "topk", "shared_memory"]
    others = [p for p in space if not any(p.endswith(k) for k in cell_keys) and complete[p].nunique(dropna=True) > 1] \
        if not complete.empty else []
    over = f", best over {', '.join(short_names(space)[p] for p in others)}" if others else ""
    if varies("num_memories"):
        data = _per_seed(_best_per_cell(df, cell_keys, direction), metric)
        data["shared_memory"] = data["shared_memory"].map({True: "shared", False: "no shared"})
        rows = "rule" if data["rule"].nunique() > 1 else None
        n_hue = data["shared_memory"].nunique()
        g = sns.catplot(data=data, kind="point", x="num_memories", y=metric, hue="shared_memory",
                        col="topk", row=rows, errorbar=errorbar, dodge=0.25 if n_hue > 1 else False, height=3.2,
                        aspect=1.0, order=sorted(data["num_memories"].unique()), markers=["o", "s"][:n_hue],
                        linestyles=["-", "--"][:n_hue])
        g.set_axis_labels("memories (num_memories)", metric)
        save(g, "objective_vs_num_memories.png", f"{study.study_name}: {metric} vs memories{spread}{over}")
    # variants: searched parameters of named values that no config column shows (a bundle such as a protocol's
    # layouts; a rule or a router, searched or bundled, has its own figure)
    variants = [p for p in space if p not in CONFIG_COLUMNS and p not in CONFIG_COLUMNS.values() and varies(p)
                and complete[p].map(lambda v: isinstance(v, str)).all()]
    for name in variants:
        x = "rule" if varies("rule") else None
        cells = [c for c in (x, name) if c]
        rest = [short for p, short in short_names(space).items() if short not in cells and p != name and varies(p)]
        data = _per_seed(_best_per_cell(df, cells, direction), metric)
        order = _value_order(study, name, complete[name], set(data[name]))
        g = sns.catplot(data=data, kind="bar", x=x or name, y=metric, hue=name, hue_order=order,
                        order=None if x else order, errorbar=_t_interval if seeds > 1 else None, height=3.6,
                        aspect=1.9 if x else 1.4, palette="colorblind", legend=bool(x), alpha=0.85)
        rng = np.random.get_state()  # seaborn jitters the dots with NumPy's global generator: seeded, so that
        np.random.seed(0)  # the figure is the same file each time it is drawn from the same trials
        try:
            for ax in g.axes.flat:  # every seed as a dot on its bar
                sns.stripplot(data=data, x=x or name, y=metric, hue=name, hue_order=order,
                              order=None if x else order, dodge=bool(x), palette=["black"] * len(order), size=3,
                              jitter=0.08, legend=False, ax=ax)
        finally:
            np.random.set_state(rng)
        g.set_axis_labels(x or name, metric.replace("/", "/\n"))
        best = f", the best {' x '.join(rest)} of each" if rest else ""
        ci = f"mean, 95 % interval and each of {seeds} seeds{best}" if seeds > 1 else best.lstrip(", ")
        if seeds > 1 and data[metric].between(0, 1).all():  # a fraction (an accuracy): its axis stays [0, 1]
            for ax in g.axes.flat:
                ax.set_ylim(-0.02, 1.05)
            ci += "; intervals cut at 0 and 1"
        save(g, f"objective_by_{name}.png", f"{study.study_name}: {metric} per {name}" + (f"\n({ci})" if ci else ""))
    if varies("rule") and not variants:
        data = _per_seed(_best_per_cell(df, ["rule", "num_memories"], direction), metric)
        g = sns.catplot(data=data, kind="bar", x="rule", y=metric, hue="num_memories", errorbar=errorbar,
                        height=3.5, aspect=1.6)
        save(g, "objective_by_rule.png", f"{study.study_name}: {metric} per rule (best over other parameters)")
    if varies("router"):
        x = "aux_loss_scale" if varies("aux_loss_scale") else "num_memories"
        data = _per_seed(_best_per_cell(df, ["router", x], direction), metric)
        g = sns.catplot(data=data, kind="point", x=x, y=metric, hue="router", errorbar=errorbar, dodge=0.3,
                        height=3.5, aspect=1.6)  # router varies: at least two hue levels
        save(g, "objective_by_router.png", f"{study.study_name}: {metric} per router{spread}")
    effects = main_effects(df, space)
    if effects:
        n = int((df["state"] == "COMPLETE").sum())
        save(importance_figure(effects, metric, short_names(space), n), "param_importances.png",
             f"{study.study_name}: what each parameter explains of {metric}")
        report.effects = effects
    curves = _curve_rows(df)
    if not curves.empty:
        save(learning_curves_figure(curves, space, metric, effects), "learning_curves.png",
             f"{study.study_name}: learning curves (first seed)")


def _value_order(study, name: str, values, present: set) -> list:
    """The order of a searched parameter's values on a figure: as the spec lists them (a protocol's layouts as
    written), then any value the spec lacks in the order the trials ran; only the values ``present``."""
    declared = study.user_attrs.get(SPEC_ATTR, {}).get("space", {}).get(name, {}).get("values") or []
    return [v for v in dict.fromkeys([*declared, *values]) if v in present]


def _curve_rows(df):
    """One row per trial that was not queued again, with the learning curve of its first seed: its own or, where
    that seed ran in a trial it replaces (a run stopped by the job's end and queued again keeps its finished
    seeds), the longest of theirs. A trial that was queued again is left out: its cell's curve is its retry's."""
    rows = df[df["retried_as"].isna()].copy()
    earlier = df[df["retried_as"].notna() & df["intermediate"].notna()]

    def curve(r):
        if isinstance(r["intermediate"], str):
            return r["intermediate"]
        found = earlier.loc[earlier["retried_as"] == r["number"], "intermediate"]
        return max(found, key=lambda c: len(json.loads(c)), default=None)

    rows["intermediate"] = [curve(r) for _, r in rows.iterrows()]
    return rows[rows["intermediate"].notna()]


def _t_interval(values) -> tuple[float, float]:
    """The 95 % interval of the mean of ``values`` (Student's t), as the claims' verdicts use it."""
    from momkit.sweep.verdicts import t975

    v = [float(x) for x in values]
    n = len(v)
    mean = sum(v) / n
    if n < 2:
        return mean, mean
    half = t975(n - 1) * math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1) / n)
    return mean - half, mean + half


def importance_figure(effects: dict[str, float], metric: str, names: dict[str, str], n_complete: int):
    """One panel: for each searched parameter, the share of the objective's variance its values explain alone
    (``main_effects``), with what that means written under it."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    order = sorted(effects, key=effects.get, reverse=True)
    fig, ax = plt.subplots(figsize=(6, 1.6 + 0.45 * len(effects)))
    sns.barplot(x=[effects[k] for k in order], y=[names.get(k, k) for k in order], ax=ax, color="C0")
    for i, k in enumerate(order):
        ax.text(min(effects[k], 0.97) + 0.01, i, f"{effects[k]:.2f}", va="center", fontsize=9)
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"share of the variance of {metric} explained by the parameter alone (eta squared)")
    ax.set_title(f"over {n_complete} complete trials; interactions are not counted, so the shares need not sum "
                 "to 1", fontsize=9)
    return fig


STATE_STYLES = {"COMPLETE": "-", "PRUNED": "--", "FAIL": ":", "RUNNING": "-."}
_MAX_COLOURS = 10


def learning_curves_figure(curves, space: list[str], metric: str, effects: dict[str, float] | None = None):
    """The curves the pruner saw (``intermediate``), coloured by the swept parameters: one colour per parameter
    combination when there are at most 10, else one per value of the parameter that explains most of the
    objective (``effects``) or, failing that, the first with at most 10 values; the line style is the outcome."""
    import matplotlib.pyplot as plt

    names = short_names(space)
    varying = [p for p in space if p in curves and curves[p].nunique(dropna=False) > 1]

    def label(r, params) -> str:
        return " ".join(f"{names[p]}={fmt_value(r[p])}" for p in params) or "all trials"

    keys = [label(r, varying) for _, r in curves.iterrows()]
    colour_by = "the swept parameters"
    if len(set(keys)) > _MAX_COLOURS:
        few = [p for p in varying if curves[p].nunique(dropna=False) <= _MAX_COLOURS]
        ranked = sorted(few, key=lambda p: -(effects or {}).get(p, 0.0))
        if ranked:
            colour_by = names[ranked[0]]
            keys = [label(r, ranked[:1]) for _, r in curves.iterrows()]
    order = list(dict.fromkeys(sorted(keys)))
    palette = plt.get_cmap("tab10" if len(order) <= 10 else "viridis")
    colour = {k: palette(i if len(order) <= 10 else i / max(len(order) - 1, 1)) for i, k in enumerate(order)}
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for key, (_, r) in zip(keys, curves.iterrows()):
        pts = sorted((int(k), v) for k, v in json.loads(r["intermediate"]).items())
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=colour[key], ls=STATE_STYLES.get(r["state"], ":"),
                marker="." if len(pts) < 30 else None, alpha=0.85, lw=1.4)
    handles = [plt.Line2D([], [], color=colour[k], lw=2, label=k) for k in order]
    states = [s for s in STATE_STYLES if (curves["state"] == s).any()]
    if len(states) > 1 or states != ["COMPLETE"]:
        handles += [plt.Line2D([], [], color="0.3", ls=STATE_STYLES[s], label=s.lower()) for s in states]
    ax.legend(handles=handles, title=f"colour: {colour_by}" + ("; line: outcome" if len(handles) > len(order)
                                                                 else ""),
              fontsize=8, title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_xlabel("training step")
    ax.set_ylabel(metric)
    return fig


def _best_config(study, df, direction: str, metric: str, out_dir: Path, report: Report) -> None:
    import yaml

    complete = df[df["state"] == "COMPLETE"].dropna(subset=["objective"])
    if complete.empty:
        report.notes.append("no complete trial: no best_config.yaml")
        return
    best = complete.loc[complete["objective"].idxmax() if direction == "maximize" else complete["objective"].idxmin()]
    trial = study.trials[int(best["number"])]
    cfg = yaml.safe_load(trial.user_attrs["config"])
    cfg["run"].update({"name": f"{study.study_name}-best", "dir": None, "progress": True})
    std = f" ± {best['objective_std']:.4f}" if best["seeds"] and best["seeds"] > 1 else ""
    header = (f"# Best trial {trial.number} of study {study.study_name!r}: {metric} = {best['objective']:.4f}{std}\n"
              f"# params: {json.dumps(trial.params)}\n# train it again: momkit train best_config.yaml\n")
    path = out_dir / "best_config.yaml"
    path.write_text(header + yaml.safe_dump(cfg, sort_keys=False))
    report.files.append(path)


def _verdicts(df, claims: list[dict], fp: dict, metric: str, direction: str, out_dir: Path,
              report: Report, figures: bool = True) -> list[dict]:
    """The claims' verdicts, written to ``claims.csv``, ``claims.md`` and ``claims.png``; [] without claims."""
    import pandas as pd

    from momkit.sweep.verdicts import markdown, verdicts

    if not claims:
        return []
    rows = verdicts(df, claims, {name: param_column(name) for name in fp.get("space", {})}, direction)
    pd.DataFrame(rows).to_csv(out_dir / "claims.csv", index=False)
    (out_dir / "claims.md").write_text(markdown(rows, metric))
    report.files += [out_dir / "claims.csv", out_dir / "claims.md"]
    if figures:
        import matplotlib.pyplot as plt

        from momkit.sweep.verdicts import figure

        fig = figure(rows, metric)
        if fig is not None:
            fig.savefig(out_dir / "claims.png", dpi=FIGURE_DPI, bbox_inches="tight")
            plt.close(fig)
            report.files.append(out_dir / "claims.png")
    report.verdicts = rows
    return rows


def pool_trials(df, study_name: str, fp: dict, others: list[str], storage_url: str | None):
    """``df`` (the study's trials) with the complete trials of the studies ``others`` in the same storage added
    (column ``study``: the study a row comes from; the study's own rows keep theirs), for the claims. The other
    studies must be the same experiment but for their grids: the same base config, overrides, objective, seeds and
    searched parameters, and every named value (bundle) they share defined alike; a cell they share with the study
    (the same parameter values: seeds one trained and the other reused) is taken once, from the study."""
    import pandas as pd

    space = fp.get("space", {})
    cols = [param_column(name) for name in space]
    frames = [df.assign(study=study_name)]
    seen = set(df.loc[df["state"] == "COMPLETE", cols].astype(str).itertuples(index=False, name=None))
    for other in others:
        if other == study_name:
            raise ConfigError(f"--pool {other!r} is invalid: it is the study reported; name other studies")
        ostudy = load_study(other, storage_url)
        ofp = ostudy.user_attrs.get(SPEC_ATTR, {})
        for key in ("base", "overrides", "objective", "seeds"):
            if ofp.get(key) != fp.get(key):
                raise ConfigError(f"--pool {other!r} is invalid: its {key} ({ofp.get(key)!r}) differs from "
                                  f"{study_name!r}'s ({fp.get(key)!r}); only studies of one experiment pool")
        ospace = ofp.get("space", {})
        if set(ospace) != set(space):
            raise ConfigError(f"--pool {other!r} is invalid: it searches {', '.join(ospace) or 'nothing'}, "
                              f"{study_name!r} searches {', '.join(space)}; pooled studies search the same parameters")
        for name, p in space.items():
            if ospace[name].get("type") != p.get("type"):
                raise ConfigError(f"--pool {other!r} is invalid: its {name} is a {ospace[name].get('type')} "
                                  f"parameter, {study_name!r}'s a {p.get('type')}")
            mine, theirs = p.get("bundles") or {}, ospace[name].get("bundles") or {}
            for value in sorted(set(mine) & set(theirs)):
                if mine[value] != theirs[value]:
                    raise ConfigError(f"--pool {other!r} is invalid: its {name}={value!r} sets {theirs[value]!r}, "
                                      f"{study_name!r}'s sets {mine[value]!r}")
        odf = trials_frame(ostudy)
        odf = odf[odf["state"] == "COMPLETE"]
        keys = list(odf[cols].astype(str).itertuples(index=False, name=None))
        new = [k not in seen for k in keys]
        seen.update(keys)
        frames.append(odf[new].assign(study=other))
    return pd.concat(frames, ignore_index=True)


def write_report(study_name: str, storage_url: str | None = None, out_dir: str | Path | None = None, *,
                 out: TextIO | None = None, figures: bool = True, pool: list[str] | None = None) -> Report:
    """Export every trial of the study, draw the figures, print the table, write the best config; the claims
    judged on the complete trials of the studies ``pool`` as well (``pool_trials``)."""
    out = out or sys.stdout
    if out_dir is not None and Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise ConfigError(f"--out={str(out_dir)!r} is invalid: it is a file; name a directory (created if missing)")
    study = load_study(study_name, storage_url)
    fp = study.user_attrs.get(SPEC_ATTR, {})
    metric = fp.get("objective", {}).get("metric", "objective")
    direction = study.direction.name.lower()
    space = [param_column(name) for name in fp.get("space", {})]
    if out_dir is None:
        out_dir = Path(study.user_attrs.get(RUNS_DIR_ATTR, "runs/sweeps")) / study_name / "report"
    out_dir = Path(out_dir)
    df = trials_frame(study)
    if df.empty:
        raise ConfigError(f"study {study_name!r} has no trials yet")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out={str(out_dir)!r} is invalid: the directory cannot be created "
                          f"({e.strerror})") from None
    report = Report(study_name, out_dir)
    df.to_csv(out_dir / "trials.csv", index=False)
    df.to_parquet(out_dir / "trials.parquet", index=False)
    report.files += [out_dir / "trials.csv", out_dir / "trials.parquet"]
    if figures:
        _figures(df, study, metric, direction, space, out_dir, report)
    _best_config(study, df, direction, metric, out_dir, report)
    claims = study.user_attrs.get(CLAIMS_ATTR) or []
    judged = pool_trials(df, study_name, fp, pool, storage_url) if pool and claims else df
    verdict_rows = _verdicts(judged, claims, fp, metric, direction, out_dir, report, figures)
    table = _display_frame(df, metric, direction, space)
    report.table = table.to_string(index=False)
    counts = df["state"].value_counts()
    budget = study.user_attrs.get(BUDGET_ATTR)
    print(f"study {study_name!r} ({describe(storage_url or DEFAULT_STORAGE)}): {len(df)} trials"
          + (f" (budget {budget})" if budget is not None else "") + ": "
          + ", ".join(f"{n} {s.lower()}" for s, n in counts.items()), file=out)
    print(report.table, file=out)
    if report.effects:
        names = short_names(space)
        print(f"variance of {metric} explained by each parameter alone: " + ", ".join(
            f"{names.get(k, k)} {v:.2f}" for k, v in sorted(report.effects.items(), key=lambda kv: -kv[1])), file=out)
    if verdict_rows:
        pooled = f"; with the trials of {', '.join(pool)}" if pool else ""
        print(f"claims ({metric}; the best cell of each side, mean ± 95 % half-width over seeds{pooled}):", file=out)
        for r in verdict_rows:
            group = f" [{r['group']}]" if r.get("group") else ""
            print(f"  {r['claim']}{group}: {r['better']} vs {r['than']}; difference {r.get('difference', '-')}: "
                  f"{r['verdict']}", file=out)
    for note in report.notes:
        print(f"note: {note}", file=out)
    print(f"wrote {', '.join(str(p) for p in report.files)}", file=out)
    return report
