"""Sweeps end to end on SQLite (and a journal file): trials, user attributes, pruning, seeds, failures, resuming,
timeouts, the report, and bad input answered with one line, exit status 2 and nothing created."""

from __future__ import annotations

import json
import os
import re

import optuna
import pandas as pd
import pytest

from momkit.cli import main
from momkit.config import load_config
from momkit.sweep import load_spec


def _study(url: str, name: str, journal: bool = False):
    if journal:
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(url)))
    return optuna.load_study(study_name=name, storage=url)


def test_two_trial_sweep_with_two_workers_and_its_report(tmp_path, make_spec, capsys):
    spec = make_spec(tmp_path / "two.yaml")
    url = f"sqlite:///{tmp_path / 'sweeps.db'}"
    assert main(["sweep", str(spec), "--storage", url, "--workers", "2"]) == 0  # 2 child processes
    out = capsys.readouterr().out
    assert "created with 2 queued trials" in out and "2 workers here (CPU, threads per worker from" in out
    lines = [ln for ln in out.splitlines() if "] trial" in ln]
    assert len(lines) == 2 and all("COMPLETE" in ln and "valid/accuracy=" in ln for ln in lines), out
    assert "study 'two'" in out and "2 complete" in out

    study = _study(url, "two")
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert {t.params["model.mom.num_memories"] for t in trials} == {1, 2}
    assert len({t.user_attrs["worker"] for t in trials}) >= 1
    for t in trials:
        run_dir = tmp_path / "runs" / "two" / f"trial-{t.number:04d}"
        assert t.user_attrs["run_dir"] == str(run_dir)
        (tmp_path / "cfg.yaml").write_text(t.user_attrs["config"])
        cfg = load_config(str(tmp_path / "cfg.yaml"))  # the resolved config, loadable as it is
        assert cfg.model.mom.num_memories == t.params["model.mom.num_memories"]
        assert cfg.run.dir == str(run_dir / "seed-0")
        assert sorted(t.intermediate_values) == [4, 8]  # every evaluation reported for pruning
        assert t.value == pytest.approx(t.user_attrs["metrics"]["valid/accuracy"])
        events = [json.loads(x) for x in (run_dir / "seed-0" / "metrics.jsonl").read_text().splitlines()]
        assert [e["stopped"] for e in events if e.get("event") == "end"] == ["max_steps"]
        assert {"valid/load_imbalance", "valid/router_entropy"} <= set(t.user_attrs["metrics"])
    assert (tmp_path / "runs" / "two" / "workers" / "worker-0.log").is_file()

    assert main(["sweep-report", "two", "--storage", url, "--out", str(tmp_path / "report")]) == 0
    rep = capsys.readouterr().out
    assert "2 trials (budget 2): 2 complete" in rep
    assert "num_memories" in rep and "valid/accuracy" in rep
    csv = pd.read_csv(tmp_path / "report" / "trials.csv")
    parquet = pd.read_parquet(tmp_path / "report" / "trials.parquet")
    assert len(csv) == len(parquet) == 2 and list(csv["number"]) == [0, 1]
    assert set(csv["state"]) == {"COMPLETE"}
    for col in ("objective", "model.mom.num_memories", "rule", "topk", "shared_memory", "valid/accuracy",
                "valid/load_imbalance", "valid/router_entropy", "valid/dead_memories", "run_dir", "worker"):
        assert col in csv.columns, col
    assert csv["objective"].tolist() == pytest.approx([t.value for t in trials])
    for fig in ("objective_vs_num_memories.png", "learning_curves.png"):
        assert (tmp_path / "report" / fig).stat().st_size > 5000, fig
    assert not (tmp_path / "report" / "param_importances.png").exists()  # two trials say nothing about that
    best = load_config(str(tmp_path / "report" / "best_config.yaml"))
    best_trial = max(trials, key=lambda t: t.value)
    assert best.model.mom.num_memories == best_trial.params["model.mom.num_memories"]
    assert best.run.dir is None and best.run.name == "two-best"

    # the storage stays a plain Optuna storage (optuna-dashboard reads the same)
    df = study.trials_dataframe()
    assert len(df) == 2 and "user_attrs_config" in df.columns


def test_seeds_sampling_resume_and_a_larger_budget(tmp_path, make_spec, capsys):
    spec = make_spec(tmp_path / "seeded.yaml", space={"optim.lr": {"type": "float", "low": 1e-3, "high": 3e-2,
                                                                   "log": True}},
                     sampler={"name": "random", "seed": 1}, budget={"trials": 2}, seeds=[0, 3])
    url = f"sqlite:///{tmp_path / 's.db'}"
    assert main(["sweep", str(spec), "--storage", url]) == 0
    out = capsys.readouterr().out
    assert "this command ran trials 0, 1" in out and "±" in out
    trials = _study(url, "seeded").get_trials()
    assert len(trials) == 2 and all(t.state.name == "COMPLETE" for t in trials)
    for t in trials:
        per_seed = t.user_attrs["objective_per_seed"]
        assert len(per_seed) == 2 and t.value == pytest.approx(sum(per_seed) / 2)
        assert t.user_attrs["run_dirs"] == [f"{tmp_path}/runs/seeded/trial-{t.number:04d}/seed-{s}" for s in (0, 3)]
        for s in (0, 3):
            assert load_config(f"{t.user_attrs['run_dirs'][0][:-7]}/seed-{s}/config.yaml").run.seed == s
    assert trials[0].params["optim.lr"] != trials[1].params["optim.lr"]

    assert main(["sweep", str(spec), "--storage", url]) == 0  # resumes: nothing left to do
    out = capsys.readouterr().out
    assert "resumed (budget 2 trials)" in out and "this command ran" not in out
    assert len(_study(url, "seeded").get_trials()) == 2

    assert main(["sweep", str(spec), "--storage", url, "--n-trials", "3"]) == 0
    out = capsys.readouterr().out
    assert "budget 2 -> 3 trials" in out and "this command ran trial 2" in out
    assert [t.state.name for t in _study(url, "seeded").get_trials()] == ["COMPLETE"] * 3

    assert main(["sweep", str(spec), "--storage", url, "--n-trials", "4"]) == 0
    assert main(["sweep-report", "seeded", "--storage", url]) == 0  # default folder: <runs_dir>/<study>/report
    out = capsys.readouterr().out
    report = tmp_path / "runs" / "seeded" / "report"
    assert "variance of valid/accuracy explained by each parameter alone: lr " in out  # in 2 quantile bins
    assert (report / "param_importances.png").stat().st_size > 5000
    from PIL import Image

    for fig in report.glob("*.png"):
        assert Image.open(fig).info["dpi"] == pytest.approx((150, 150), abs=0.1), fig.name
    assert not (report / "objective_vs_num_memories.png").exists()  # num_memories did not vary
    df = pd.read_parquet(report / "trials.parquet")
    assert (df["seeds"] == 2).all() and df["objective_std"].notna().all()
    assert [json.loads(x) for x in df["objective_per_seed"]] == \
        [t.user_attrs["objective_per_seed"] for t in _study(url, "seeded").get_trials()]


def test_median_pruner_prunes_a_hopeless_trial(tmp_path, make_spec, capsys):
    sections = dict(space={"optim.lr": [3e-2, 1e-7]}, objective={"metric": "valid/loss", "direction": "minimize"},
                    pruner={"name": "median", "startup_trials": 1, "warmup_steps": 0},
                    overrides={"optim.warmup_steps": 0})
    seed = next(s for s in range(50)  # a grid order that runs the hopeless learning rate second
                if load_spec(make_spec(tmp_path / "p.yaml", sampler={"name": "grid", "seed": s}, **dict(sections)))
                .grid[0]["optim.lr"] == 3e-2)
    spec = make_spec(tmp_path / "p.yaml", sampler={"name": "grid", "seed": seed}, **sections)
    url = f"sqlite:///{tmp_path / 'p.db'}"
    assert main(["sweep", str(spec), "--storage", url]) == 0
    trials = _study(url, "p").get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "PRUNED"]
    assert trials[1].params["optim.lr"] == 1e-7 and sorted(trials[1].intermediate_values) == [4]
    assert "pruned at step 4: valid/loss=" in trials[1].user_attrs["pruned"]
    assert "PRUNED" in capsys.readouterr().out


def test_a_failed_trial_keeps_its_error_and_the_others_run(tmp_path, make_spec, capsys):
    # model.vocab_size=16 cannot hold the task's 32 tokens: train() refuses it
    spec = make_spec(tmp_path / "f.yaml", space={"model.vocab_size": [32, 16]}, drop=("model.vocab_size",))
    url = f"sqlite:///{tmp_path / 'f.db'}"
    assert main(["sweep", str(spec), "--storage", url]) == 0
    trials = {t.params["model.vocab_size"]: t for t in _study(url, "f").get_trials()}
    assert trials[32].state.name == "COMPLETE"
    assert trials[16].state.name == "FAIL"
    assert trials[16].user_attrs["error"] == ("ConfigError: model.vocab_size=16 is invalid: the task needs at least "
                                              "32 (task.vocab_size)")
    out = capsys.readouterr().out
    assert "FAIL" in out and "the task needs at least 32" in out
    main(["sweep-report", "f", "--storage", url, "--out", str(tmp_path / "rep")])
    csv = pd.read_csv(tmp_path / "rep" / "trials.csv")
    assert csv.loc[csv["state"] == "FAIL", "message"].str.contains("the task needs at least 32").all()


def test_a_sweep_whose_every_trial_failed_exits_1_with_the_first_error(tmp_path, make_spec, momkit_cmd):
    spec = make_spec(tmp_path / "allfail.yaml", space={"model.vocab_size": [8, 16]}, drop=("model.vocab_size",))
    r = momkit_cmd("sweep", spec, "--storage", f"sqlite:///{tmp_path / 'a.db'}", cwd=tmp_path, check=False)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and "2 fail" in r.stdout
    first = min(_study(f"sqlite:///{tmp_path / 'a.db'}", "allfail").get_trials(), key=lambda t: t.number)
    assert r.stderr.strip().splitlines()[-1] == (
        f"momkit: no trial of study 'allfail' completed (2 failed); the first failure: trial 0: ConfigError: "
        f"model.vocab_size="
        f"{first.params['model.vocab_size']} is invalid: the task needs at least 32 (task.vocab_size) (once fixed, "
        "--retry-failed runs the failed trials again)")


def test_invalid_sampled_combinations_are_skipped_and_replaced(tmp_path, make_spec, capsys):
    # random sampling of num_memories x topk draws topk=2 with one memory now and then: skipped, not failed
    spec = make_spec(tmp_path / "inv.yaml", space={"model.mom.num_memories": [1, 2], "model.mom.topk": [1, 2]},
                     sampler={"name": "random", "seed": 6}, budget={"trials": 4}, drop=("model.mom.topk",),
                     overrides={"optim.max_steps": 4})
    url = f"sqlite:///{tmp_path / 'inv.db'}"
    assert main(["sweep", str(spec), "--storage", url]) == 0
    trials = _study(url, "inv").get_trials()
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    skipped = [t for t in trials if t.user_attrs.get("skipped")]
    assert len(complete) == 4 and len(skipped) >= 1 and len(trials) == len(complete) + len(skipped)
    assert all(t.params["model.mom.topk"] <= t.params["model.mom.num_memories"] for t in complete)
    for t in skipped:
        assert t.state.name == "PRUNED" and (t.params["model.mom.num_memories"], t.params["model.mom.topk"]) == (1, 2)
        assert t.user_attrs["skipped"] == "model.mom.topk=2 is invalid: must be <= num_memories=1"
    assert "SKIPPED" in capsys.readouterr().out


def test_timeout_stops_starting_trials_and_a_journal_storage_resumes(tmp_path, make_spec, capsys):
    spec = make_spec(tmp_path / "j.yaml")
    url = f"journal:{tmp_path / 'sweeps.journal'}"
    assert main(["sweep", str(spec), "--storage", url, "--timeout", "0.001"]) == 0
    assert "2 waiting" in capsys.readouterr().out  # no trial started after the timeout; both stay queued
    assert main(["sweep", str(spec), "--storage", url]) == 0
    assert "this command ran trials 0, 1" in capsys.readouterr().out
    assert [t.state.name for t in _study(url.replace("journal:", ""), "j", journal=True).get_trials()] == \
        ["COMPLETE", "COMPLETE"]
    assert main(["sweep-report", "j", "--storage", url, "--out", str(tmp_path / "rep")]) == 0
    assert len(pd.read_parquet(tmp_path / "rep" / "trials.parquet")) == 2


def test_timeout_stops_starting_seeds_and_queues_the_trial_again_with_its_finished_seeds(tmp_path, make_spec,
                                                                                         monkeypatch, capsys):
    """A trial's seeds run one after another: past the timeout its next seed does not start; the trial is queued
    again and the retry trains only the seeds left."""
    import time

    from momkit.sweep import runner

    train_seed = runner._train_seed

    def slow(*args, **kwargs):  # each seed outlasts the timeout
        result = train_seed(*args, **kwargs)
        time.sleep(5.5)
        return result

    monkeypatch.setattr(runner, "_train_seed", slow)
    spec = make_spec(tmp_path / "t.yaml", study="t", space={"model.mom.num_memories": [2]}, seeds=[0, 1])
    url = f"sqlite:///{tmp_path / 't.db'}"
    # the timeout counts from the worker's start (storage, study): long enough that a loaded machine still
    # starts the first seed within it
    assert main(["sweep", str(spec), "--storage", url, "--timeout", "5"]) == 0
    first = _study(url, "t").get_trials()
    assert [t.state.name for t in first] == ["FAIL", "WAITING"]
    assert first[0].user_attrs["error"] == "timeout before seed 1; queued again"
    assert list(first[0].user_attrs["seeds_done"]) == ["0"]
    capsys.readouterr()
    monkeypatch.setattr(runner, "_train_seed", train_seed)
    assert main(["sweep", str(spec), "--storage", url]) == 0
    retry = _study(url, "t").get_trials()[1]
    assert retry.state.name == "COMPLETE"
    assert retry.user_attrs["run_dirs"] == [str(tmp_path / "runs/t/trial-0000/seed-0"),
                                            str(tmp_path / "runs/t/trial-0001/seed-1")]


def test_retry_failed_queues_the_trials_an_error_failed_and_keeps_their_finished_seeds(tmp_path, make_spec,
                                                                                        monkeypatch, capsys):
    from momkit.sweep import runner

    train_seed = runner._train_seed
    calls = []

    def broken(cfg, *args, **kwargs):  # seed 1 of every trial fails (a bug, since fixed)
        calls.append(cfg.run.seed)
        if cfg.run.seed == 1:
            raise RuntimeError("a bug")
        return train_seed(cfg, *args, **kwargs)

    monkeypatch.setattr(runner, "_train_seed", broken)
    spec = make_spec(tmp_path / "r.yaml", study="r", seeds=[0, 1])
    url = f"sqlite:///{tmp_path / 'r.db'}"
    assert main(["sweep", str(spec), "--storage", url]) == 1  # no trial completed
    assert [t.state.name for t in _study(url, "r").get_trials()] == ["FAIL", "FAIL"]
    monkeypatch.setattr(runner, "_train_seed", train_seed)
    capsys.readouterr()
    assert main(["sweep", str(spec), "--storage", url]) == 1  # without the option the failed cells stay failed
    out, err = capsys.readouterr()
    assert "nothing left to run" in out and "--retry-failed runs the failed trials again" in err
    calls.clear()
    monkeypatch.setattr(runner, "_train_seed",
                        lambda cfg, *a, **k: calls.append(cfg.run.seed) or train_seed(cfg, *a, **k))
    assert main(["sweep", str(spec), "--storage", url, "--retry-failed"]) == 0
    assert "queued again: 2 failed trials (0, 1)" in capsys.readouterr().out
    trials = _study(url, "r").get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "FAIL", "COMPLETE", "COMPLETE"]
    assert calls == [1, 1]  # only the seeds the bug failed trained again
    assert sorted(t.params["model.mom.num_memories"] for t in trials[2:]) == [1, 2]
    assert main(["sweep", str(spec), "--storage", url, "--retry-failed"]) == 0  # nothing failed is left to retry
    assert "queued again: 0 failed trials" in capsys.readouterr().out


def test_local_workers_get_a_gpu_each_or_a_share_of_the_cores():
    from momkit.sweep.workers import worker_env

    assert [worker_env(i, ["2", "5"], None)["CUDA_VISIBLE_DEVICES"] for i in range(3)] == ["2", "5", "2"]
    env = worker_env(1, [], 4)
    assert env["OMP_NUM_THREADS"] == "4" and env.get("CUDA_VISIBLE_DEVICES") == os.environ.get("CUDA_VISIBLE_DEVICES")
    env = worker_env(3, ["0"], 2)  # several workers on one GPU share the cores too
    assert env["CUDA_VISIBLE_DEVICES"] == "0" and env["OMP_NUM_THREADS"] == "2"


FAKE_MPS = """#!/bin/sh
echo "args=$* pipe=$CUDA_MPS_PIPE_DIRECTORY stdin=$(cat)" >> "{log}"; [ {status} = 0 ] || echo "cannot start: no GPU"
exit {status}
"""


@pytest.mark.parametrize("status", [0, 3])
def test_mps_daemon_starts_and_quits_around_the_workers(tmp_path, monkeypatch, status):
    """``--mps``: the control daemon is started (``-d``) with its folders under the study's runs, the workers get
    its pipe folder, and it is told to quit when they end, also when they fail; a daemon that does not start is
    one clear error; no daemon on the PATH is one too."""
    from momkit.config import ConfigError
    from momkit.sweep.workers import MPS_CONTROL, mps_daemon

    bin_dir, log = tmp_path / "bin", tmp_path / "mps.log"
    bin_dir.mkdir()
    fake = bin_dir / MPS_CONTROL
    fake.write_text(FAKE_MPS.format(log=log, status=status))
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    folder = tmp_path / "runs" / "study" / "mps"
    if status:
        failed = rf"--mps: {MPS_CONTROL} -d failed with status 3: cannot start: no GPU"
        with pytest.raises(ConfigError, match=failed), mps_daemon(folder):
            pass
        return
    with pytest.raises(RuntimeError, match="a worker failed"), mps_daemon(folder) as env:
        assert env == {"CUDA_MPS_PIPE_DIRECTORY": str(folder / "pipe"), "CUDA_MPS_LOG_DIRECTORY": str(folder / "log")}
        assert (folder / "pipe").is_dir() and (folder / "log").is_dir()
        raise RuntimeError("a worker failed")
    calls = log.read_text().splitlines()
    assert calls == [f"args=-d pipe={folder / 'pipe'} stdin=", f"args= pipe={folder / 'pipe'} stdin=quit"]

    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    with pytest.raises(ConfigError, match=rf"--mps is invalid here: {MPS_CONTROL} .* is not on the PATH"), \
            mps_daemon(folder):
        pass


def test_a_different_spec_cannot_resume_a_study(tmp_path, make_spec, capsys):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    spec = make_spec(tmp_path / "x.yaml", space={"model.mom.num_memories": [1]})
    assert main(["sweep", str(spec), "--storage", url]) == 0
    make_spec(tmp_path / "x.yaml", space={"model.mom.num_memories": [2]})
    capsys.readouterr()
    assert main(["sweep", str(spec), "--storage", url]) == 2
    err = capsys.readouterr().err
    assert err.startswith("momkit: error: study 'x' was created from a different spec (space changed)")
    assert err.count("\n") == 1


BAD_INPUT = [
    (["sweep", "nope.yaml"], r"sweep spec 'nope.yaml' does not exist"),
    (["sweep", "{bad}"], r"unknown key 'sapce'; did you mean 'space'\?"),
    (["sweep", "{spec}", "--storage", "foo://x"], r"--storage='foo://x' is invalid: unknown database dialect 'foo'"),
    (["sweep", "{spec}", "--storage", "not a url"], r"--storage='not a url' is invalid: not a URL"),
    (["sweep", "{spec}", "--storage", "journal:"], r"--storage='journal:' is invalid: journal: needs a file path"),
    (["sweep", "{spec}", "--storage", "sqlite://"], r"an in-memory SQLite database cannot be shared"),
    (["sweep", "{spec}", "--storage", "postgresql://nobody@127.0.0.1:1/nodb"],
     r"--storage='postgresql://nobody@127.0.0.1:1/nodb': cannot open the storage: .*"),
    (["sweep", "{spec}", "--storage", "postgresql://u:secret@127.0.0.1:1/db"], r"postgresql://u:\*\*\*@127.0.0.1:1/db"),
    (["sweep", "{spec}", "--workers", "0"], r"--workers=0 is invalid: must be an int >= 1"),
    (["sweep", "{spec}", "--workers", "2", "--mps"], r"--mps is invalid: no CUDA GPU is visible on this machine"),
    (["sweep", "{spec}", "--n-trials", "5"], r"--n-trials=5 is invalid: the grid of .* has 2 valid points"),
    (["sweep", "{spec}", "--timeout", "-1"], r"--timeout=-1.0 is invalid"),
    (["sweep", "{spec}", "--study", "../up"], r"--study='../up' is invalid"),
    (["sweep", "{spec}", "--n-trials", "many"], r"argument --n-trials: invalid int value: 'many'"),
    (["sweep-report", "demo"], r"--storage='sqlite:///runs/sweeps.db': runs/sweeps.db does not exist"),
    (["sweep-report", "demo", "--storage", "journal:j.log"], r"j.log does not exist"),
    (["sweep", "{empty}"], r"sweep spec .*empty.yaml: space=\{\} is invalid: a non-empty mapping of dotted config "
                           r"keys \(or bundle names\) to values or distributions is required"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_INPUT, ids=[m[:30] for _, m in BAD_INPUT])
def test_bad_input_is_one_line_exit_2_and_creates_nothing(tmp_path, make_spec, capsys, monkeypatch, list_files,
                                                          argv, message):
    work = tmp_path / "work"
    work.mkdir()
    spec = make_spec(tmp_path / "good.yaml", runs_dir=str(work / "runs"))
    bad = make_spec(tmp_path / "bad.yaml", sapce={})
    empty = make_spec(tmp_path / "empty.yaml", space={})
    monkeypatch.chdir(work)
    argv = [a.format(spec=spec, bad=bad, empty=empty) for a in argv]
    try:
        status = main(argv)
    except SystemExit as e:  # argparse's own errors
        status = e.code
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("momkit: error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err
    assert "secret" not in err
    assert list_files(work) == []  # no database, no runs folder, no report


def test_report_of_an_unknown_study_lists_the_studies(tmp_path, make_spec, capsys):
    url = f"sqlite:///{tmp_path / 'r.db'}"
    spec = make_spec(tmp_path / "r.yaml", space={"model.mom.num_memories": [1]})
    assert main(["sweep", str(spec), "--storage", url]) == 0
    capsys.readouterr()
    assert main(["sweep-report", "nope", "--storage", url]) == 2
    assert "momkit: error: no study 'nope' in sqlite:///" in capsys.readouterr().err


def test_main_effects_are_the_variance_each_parameter_explains_alone():
    from momkit.sweep.report import main_effects

    # y = 2a + b over a full 2 x 2 grid: a explains 4/5 of the variance, b 1/5, c (constant) is left out
    df = pd.DataFrame({"state": ["COMPLETE"] * 4 + ["FAIL"], "objective": [0.0, 1.0, 2.0, 3.0, None],
                       "a": [0, 0, 1, 1, 5], "b": [0, 1, 0, 1, 5], "c": [7, 7, 7, 7, 7]})
    effects = main_effects(df, ["a", "b", "c"])
    assert effects == pytest.approx({"a": 0.8, "b": 0.2})
    assert main_effects(df.iloc[:2], ["a", "b"]) == {}  # fewer than 3 complete trials
    # a float with one value per trial is binned by quantiles (here 2 bins: {0, 1} and {2, 3})
    lr = pd.DataFrame({"state": ["COMPLETE"] * 4, "objective": [0.0, 1.0, 2.0, 3.0], "lr": [1e-4, 2e-4, 3e-4, 4e-4]})
    assert main_effects(lr, ["lr"]) == pytest.approx({"lr": 0.8})


def test_bundles_end_to_end_and_the_router_figure(tmp_path, make_spec, capsys):
    # a bundle named like a config column (router) gets its own column; dense needs topk = num_memories
    spec = make_spec(tmp_path / "rt.yaml", drop=("model.mom.topk",), overrides={"model.mom.num_memories": 2},
                     space={"router": {"type": "bundle", "values": {
                         "sparse": {"model.mom.router": "topk_softmax", "model.mom.topk": 1},
                         "dense": {"model.mom.router": "dense", "model.mom.topk": 2}}},
                         "model.mom.aux_loss_scale": [0.0, 0.1]})
    url = f"sqlite:///{tmp_path / 'rt.db'}"
    assert main(["sweep", str(spec), "--storage", url]) == 0
    assert main(["sweep-report", "rt", "--storage", url, "--out", str(tmp_path / "rep")]) == 0
    df = pd.read_csv(tmp_path / "rep" / "trials.csv")
    assert len(df) == 4 and set(df["state"]) == {"COMPLETE"}
    assert dict(zip(df["router (param)"], df["router"])) == {"sparse": "topk_softmax", "dense": "dense"}
    assert dict(zip(df["router (param)"], df["topk"])) == {"sparse": 1, "dense": 2}
    assert (tmp_path / "rep" / "objective_by_router.png").stat().st_size > 5000
    assert "router=dense" in capsys.readouterr().out


def test_the_importance_figure_is_one_explained_panel():
    from momkit.sweep.report import importance_figure

    fig = importance_figure({"model.mom.topk": 0.6, "optim.lr": 0.1}, "valid/accuracy",
                            {"model.mom.topk": "topk", "optim.lr": "lr"}, 12)
    assert len(fig.axes) == 1
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["topk", "lr"]
    assert "explained by the parameter alone (eta squared)" in ax.get_xlabel()
    assert "12 complete trials" in ax.get_title() and "need not sum to 1" in ax.get_title()


def test_learning_curves_are_coloured_by_the_swept_parameters():
    from momkit.sweep.report import learning_curves_figure

    curve = json.dumps({"4": 0.2, "8": 0.5})
    df = pd.DataFrame({"number": [0, 1, 2], "state": ["COMPLETE", "PRUNED", "COMPLETE"],
                       "model.mom.num_memories": [1, 2, 2], "model.mom.shared_memory": [True, True, False],
                       "intermediate": [curve] * 3})
    fig = learning_curves_figure(df, ["model.mom.num_memories", "model.mom.shared_memory"], "valid/accuracy")
    ax = fig.axes[0]
    lines = [ln for ln in ax.get_lines() if len(ln.get_xdata())]
    assert len({ln.get_color() for ln in lines}) == 3  # three parameter combinations, three colours
    assert [ln.get_linestyle() for ln in lines] == ["-", "--", "-"]  # the pruned one dashed
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["num_memories=1 shared_memory=on", "num_memories=2 shared_memory=off",
                      "num_memories=2 shared_memory=on", "complete", "pruned"]
    assert ax.get_legend().get_title().get_text() == "colour: the swept parameters; line: outcome"

    # more combinations than colours: coloured by the parameter that explains most
    many = pd.DataFrame({"number": range(12), "state": ["COMPLETE"] * 12, "a": range(12), "b": [0, 1] * 6,
                         "intermediate": [curve] * 12})
    fig = learning_curves_figure(many, ["a", "b"], "valid/accuracy", effects={"a": 0.1, "b": 0.5})
    legend = fig.axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["b=0", "b=1"]
    assert legend.get_title().get_text() == "colour: b"


def test_a_trial_queued_again_gives_its_curve_to_its_retry():
    """A cell stopped by the job's end ran its first seed in the trial that was queued again; the learning curves
    show that curve once, under the retry that completed the cell, and not the replaced trials."""
    from momkit.sweep.report import _curve_rows

    short, full = json.dumps({"4": 0.1}), json.dumps({"4": 0.1, "8": 0.3})
    df = pd.DataFrame({"number": [0, 1, 2, 3, 4], "state": ["FAIL", "FAIL", "FAIL", "COMPLETE", "COMPLETE"],
                       "retry_of": [None, 0, 0, 0, None], "retried_as": [3, 3, 3, None, None],
                       "intermediate": [short, full, None, None, short]})
    rows = _curve_rows(df)
    assert rows["number"].tolist() == [3, 4]
    assert rows["intermediate"].tolist() == [full, short]  # the longest of the replaced trials' curves

def test_a_cell_another_study_trained_is_reused_not_trained_again(tmp_path, make_spec, capsys):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    first = make_spec(tmp_path / "first.yaml", space={"model.mom.num_memories": [1, 2]})
    second = make_spec(tmp_path / "second.yaml", space={"model.mom.num_memories": [2, 4]})
    assert main(["sweep", str(first), "--storage", url]) == 0
    assert main(["sweep", str(second), "--storage", url]) == 0
    capsys.readouterr()
    done = {t.params["model.mom.num_memories"]: t for t in _study(url, "first").get_trials()}
    again = {t.params["model.mom.num_memories"]: t for t in _study(url, "second").get_trials()}
    assert [t.state.name for t in again.values()] == ["COMPLETE", "COMPLETE"]
    reused = again[2].user_attrs["seeds_done"]["0"]
    assert reused["reused_from"] == f"first trial {done[2].number} seed 0"
    assert again[2].value == done[2].value and again[2].user_attrs["run_dirs"] == done[2].user_attrs["run_dirs"]
    assert not (tmp_path / "runs" / "second" / f"trial-{again[2].number:04d}" / "seed-0").exists()  # not trained
    assert "reused_from" not in again[4].user_attrs["seeds_done"]["0"]  # a new cell trains
    assert (tmp_path / "runs" / "second" / f"trial-{again[4].number:04d}" / "seed-0" / "metrics.jsonl").is_file()

    # a different evaluation of the same runs (the last instead of the best) is not the same outcome
    third = make_spec(tmp_path / "third.yaml", space={"model.mom.num_memories": [2]},
                      objective={"metric": "valid/accuracy", "direction": "maximize", "from": "final"})
    assert main(["sweep", str(third), "--storage", url]) == 0
    assert "reused_from" not in _study(url, "third").get_trials()[0].user_attrs["seeds_done"]["0"]


def test_a_bundle_of_named_variants_gets_its_own_figure(tmp_path, make_spec, capsys):
    """A protocol's layouts (a bundle of named variants) beside a searched learning rate: one bar per variant,
    the best learning rate of each, with the 95 % interval over seeds and every seed drawn, the same each time."""
    spec = make_spec(tmp_path / "lay.yaml", seeds=[0, 1],
                     space={"layout": {"type": "bundle", "values": {"one": {"model.mom.num_memories": 1},
                                                                     "two": {"model.mom.num_memories": 2}}},
                            "optim.lr": [1e-3, 3e-3]})
    url = f"sqlite:///{tmp_path / 'lay.db'}"
    assert main(["sweep", str(spec), "--storage", url]) == 0
    assert main(["sweep-report", "lay", "--storage", url, "--out", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    assert "objective_by_layout.png" in out
    from PIL import Image

    fig = tmp_path / "rep" / "objective_by_layout.png"
    assert fig.stat().st_size > 5000 and Image.open(fig).info["dpi"] == pytest.approx((150, 150), abs=0.1)
    assert not (tmp_path / "rep" / "objective_by_rule.png").exists()
    # drawn again from the same trials, the same file (the seeds' dots jittered alike), the caller's NumPy
    # generator left where it was
    import numpy as np

    np.random.seed(123)
    state = np.random.get_state()[1].copy()
    assert main(["sweep-report", "lay", "--storage", url, "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "objective_by_layout.png").read_bytes() == fig.read_bytes()
    assert (np.random.get_state()[1] == state).all()


def test_variants_are_drawn_in_the_order_the_spec_lists_them():
    from types import SimpleNamespace

    from momkit.sweep.report import _value_order
    from momkit.sweep.runner import SPEC_ATTR

    study = SimpleNamespace(user_attrs={SPEC_ATTR: {"space": {"memories": {"values": ["m1", "m2", "m4", "m8"]}}}})
    ran = ["m4", "m4", "m8", "m1", "m2", "m9"]  # reused cells finished first; m9 a value the spec lacks
    assert _value_order(study, "memories", ran, {"m1", "m2", "m4", "m8", "m9"}) == ["m1", "m2", "m4", "m8", "m9"]
    assert _value_order(study, "memories", ran, {"m8", "m2"}) == ["m2", "m8"]
    assert _value_order(SimpleNamespace(user_attrs={}), "memories", ran, {"m1", "m4"}) == ["m4", "m1"]


def test_the_t_interval_of_the_figures_is_the_claims_interval():
    from momkit.sweep.report import _t_interval

    lo, hi = _t_interval([0.2, 0.4, 0.6])
    assert (lo + hi) / 2 == pytest.approx(0.4) and (hi - lo) / 2 == pytest.approx(4.303 * 0.2 / 3 ** 0.5)
    assert _t_interval([0.5]) == (0.5, 0.5)
