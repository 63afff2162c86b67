"""Reading a sweep's study: trials, learning curves, importances, best trials."""

from __future__ import annotations

import math

import pytest

optuna = pytest.importorskip("optuna")
pytest.importorskip("pandas")

from momkit.analysis.sweeps import (  # noqa: E402
    best_trials,
    direction_of,
    importances,
    learning_curves,
    load_trials,
    searched_params,
)
from momkit.config import ConfigError  # noqa: E402


def _study(tmp_path, n=8):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{tmp_path / 's.db'}"
    study = optuna.create_study(study_name="toy", storage=storage, direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=0))

    def objective(trial):
        m = trial.suggest_categorical("model.mom.num_memories", [1, 2, 4])
        shared = trial.suggest_categorical("model.mom.shared_memory", [True, False])
        for step in (10, 20):
            trial.report(step / 20 * (0.5 + 0.1 * m), step)
        return 0.5 + 0.1 * m + (0.0 if shared else 0.01 * trial.number)

    study.optimize(objective, n_trials=n)
    return storage


def test_trials_curves_and_best(tmp_path):
    storage = _study(tmp_path)
    study, trials = load_trials("toy", storage)
    assert len(trials) == 8 and set(trials["state"]) == {"COMPLETE"}
    assert direction_of(study) == "maximize"
    assert searched_params(study) == ["model.mom.num_memories", "model.mom.shared_memory"]
    curves = learning_curves(trials)
    assert len(curves) == 16 and sorted(curves["step"].unique()) == [10, 20]
    row = curves[(curves.number == 3) & (curves.step == 20)].iloc[0]
    assert math.isclose(row["value"], study.trials[3].intermediate_values[20])
    best = best_trials(trials, "maximize", k=3)
    assert list(best["objective"]) == sorted(trials["objective"], reverse=True)[:3]
    assert best.iloc[0]["number"] == study.best_trial.number
    worst = best_trials(trials, "minimize", k=1)
    assert worst.iloc[0]["objective"] == trials["objective"].min()
    with pytest.raises(ValueError, match="direction"):
        best_trials(trials, "up")


def test_importances(tmp_path):
    storage = _study(tmp_path, n=12)
    study, _ = load_trials("toy", storage)
    imp = importances(study)
    assert set(imp) <= set(searched_params(study)) and math.isclose(sum(imp.values()), 1.0)
    assert imp["model.mom.num_memories"] > imp.get("model.mom.shared_memory", 0.0)
    (tmp_path / "one").mkdir()
    single = _study(tmp_path / "one", n=1)
    assert importances(load_trials("toy", single)[0]) == {}  # one trial: nothing to compare


def test_missing_study_is_an_error(tmp_path):
    storage = _study(tmp_path, n=2)
    with pytest.raises(ConfigError, match="no study 'other'"):
        load_trials("other", storage)
