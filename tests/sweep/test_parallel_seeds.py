"""``momkit sweep --parallel-seeds``: a trial's seeds trained side by side in child processes give the same
outcomes as one after another, reuse and continue seeds as the sequential loop does, and refuse a pruner."""

from __future__ import annotations

import optuna
import pytest

from momkit.cli import main
from momkit.sweep.seeds import resumable


def _trials(url: str, name: str) -> list:
    return sorted(optuna.load_study(study_name=name, storage=url).get_trials(), key=lambda t: t.number)


def _values(trials) -> dict:
    return {t.params["model.mom.num_memories"]: t.user_attrs["objective_per_seed"] for t in trials}


def test_seeds_side_by_side_match_seeds_in_turn(tmp_path, make_spec, monkeypatch, capsys):
    spec = dict(seeds=[0, 1, 2], pruner={"name": "none"}, overrides={"optim.max_steps": 12, "run.eval_every": 6})
    for d in "abc":
        (tmp_path / d).mkdir()
    one = make_spec(tmp_path / "a" / "turn.yaml", **spec)
    url_one = f"sqlite:///{tmp_path / 'turn.db'}"
    assert main(["sweep", str(one), "--storage", url_one]) == 0
    # side by side, every seed trains in a child process: this worker's own train() would fail the trial
    import momkit.train

    def not_here(*args, **kwargs):
        raise AssertionError("a seed trained in the worker's process")

    monkeypatch.setattr(momkit.train, "train", not_here)
    two = make_spec(tmp_path / "b" / "side.yaml", **spec)
    url_two = f"sqlite:///{tmp_path / 'side.db'}"
    assert main(["sweep", str(two), "--storage", url_two, "--parallel-seeds"]) == 0
    capsys.readouterr()
    turn, side = _trials(url_one, "turn"), _trials(url_two, "side")
    assert [t.state.name for t in side] == ["COMPLETE", "COMPLETE"]
    assert _values(side) == _values(turn)  # CPU, one thread: the same runs, number for number
    for t in side:
        done = t.user_attrs["seeds_done"]
        assert sorted(done) == ["0", "1", "2"] and all(o["steps"] == 12 for o in done.values())
        assert sorted(t.user_attrs["seeds_started"]) == ["0", "1", "2"]
        assert t.value == pytest.approx(sum(t.user_attrs["objective_per_seed"]) / 3)
    # a study that already has those seeds (same configs) trains nothing again
    three = make_spec(tmp_path / "c" / "again.yaml", **spec)
    assert main(["sweep", str(three), "--storage", url_two, "--parallel-seeds"]) == 0
    again = _trials(url_two, "again")
    assert _values(again) == _values(side)
    assert all("reused_from" in o for t in again for o in t.user_attrs["seeds_done"].values())


def test_a_pruner_is_refused_with_parallel_seeds(tmp_path, make_spec, capsys):
    spec = make_spec(tmp_path / "p.yaml", seeds=[0, 1], pruner={"name": "median"})
    url = f"sqlite:///{tmp_path / 'p.db'}"
    assert main(["sweep", str(spec), "--storage", url, "--parallel-seeds"]) == 2
    err = capsys.readouterr().err
    assert "--parallel-seeds is invalid with pruner: median" in err and "pruner: {name: none}" in err
    assert not (tmp_path / "p.db").exists() or not optuna.get_all_study_summaries(url)


def test_a_seed_continues_only_its_own_checkpointed_run(tmp_path):
    run = tmp_path / "seed-1"
    run.mkdir()
    started = {"1": {"run_dir": str(run), "config_key": "k"}}
    assert resumable(started, "1", "k") is None  # no checkpoint yet
    (run / "last.pt").write_bytes(b"")
    assert resumable(started, "1", "k") == str(run)
    assert resumable(started, "1", "other config") is None and resumable(started, "2", "k") is None
