"""A sweep's Optuna study as tables: trials, learning curves, parameter importances, best trials.

    study, trials = load_trials("demo", "sqlite:///runs/sweeps.db")   # momkit.sweep's trials_frame
    curves = learning_curves(trials)        # one row per (trial, evaluation step): the pruner's view
    importances(study)                      # Optuna's PED-ANOVA importances of the searched parameters
    best_trials(trials, "maximize", k=5)

Reading goes through ``momkit.sweep`` (its storage URLs, its trial table); Optuna and pandas are
imported inside the functions. See docs/sweeps.md for running sweeps, docs/analysis.md for the notebook.
"""

from __future__ import annotations

import json


def load_trials(study_name: str = "demo", storage: str | None = None):
    """``(study, trials)``: the study read-only from ``storage`` (default ``sqlite:///runs/sweeps.db``) and
    one row per trial (``momkit.sweep.trials_frame``: state, objective, searched parameters, config values,
    evaluation metrics with the routing telemetry, run directory, ...)."""
    from momkit.sweep import trials_frame
    from momkit.sweep.report import load_study

    study = load_study(study_name, storage)
    return study, trials_frame(study)


def searched_params(study) -> list[str]:
    """The searched parameters of a momkit sweep (from the spec stored with the study), else every
    parameter any trial has."""
    from momkit.sweep.runner import SPEC_ATTR

    space = list(study.user_attrs.get(SPEC_ATTR, {}).get("space", {}))
    if space:
        return space
    return sorted({p for t in study.get_trials(deepcopy=False) for p in t.params})


def learning_curves(trials):
    """One row per (trial, evaluation): ``number``, ``step``, ``value`` (the objective reported to the
    pruner), with the trial's ``state``; a DataFrame."""
    import pandas as pd

    rows = []
    for _, r in trials.iterrows():
        raw = r.get("intermediate")
        if not isinstance(raw, str):
            continue
        for step, value in json.loads(raw).items():
            rows.append({"number": r["number"], "state": r["state"], "step": int(step), "value": value})
    return pd.DataFrame(rows, columns=["number", "state", "step", "value"])


def importances(study, target_quantile: float = 0.3) -> dict[str, float]:
    """Optuna's PED-ANOVA importances (Watanabe et al. 2023; no extra dependency, unlike fANOVA, which needs
    scikit-learn) of the searched parameters that vary: how much each parameter's distribution differs between
    the best ``target_quantile`` of the complete trials and all of them (shares summing to 1). It answers
    "what sets the top trials apart", not "what explains the variance" (for that, momkit.sweep.report's
    ``main_effects``). Empty when fewer than two trials completed or no parameter varies."""
    import optuna

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    varying = [p for p in searched_params(study) if len({repr(t.params.get(p)) for t in complete}) > 1]
    if len(complete) < 2 or not varying:
        return {}
    evaluator = optuna.importance.PedAnovaImportanceEvaluator(target_quantile=target_quantile)
    return dict(optuna.importance.get_param_importances(study, evaluator=evaluator, params=varying))


def best_trials(trials, direction: str = "maximize", k: int = 5):
    """The ``k`` complete trials with the best objective (ties: lower trial number first)."""
    if direction not in ("maximize", "minimize"):
        raise ValueError(f"direction must be 'maximize' or 'minimize', got {direction!r}")
    done = trials[(trials["state"] == "COMPLETE") & trials["objective"].notna()]
    done = done.assign(_key=done["objective"].map(lambda v: -v if direction == "maximize" else v))
    return done.sort_values(["_key", "number"]).head(k).drop(columns="_key")


def direction_of(study) -> str:
    """``"maximize"`` or ``"minimize"``: the study's direction."""
    return "maximize" if study.direction.name == "MAXIMIZE" else "minimize"
