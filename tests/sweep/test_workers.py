"""Many workers on one study: two independent worker processes on a real PostgreSQL server (as on two machines)
run every queued trial exactly once; a worker killed with SIGKILL mid-trial has its trial failed by the
heartbeat and retried, and the study stays readable."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

import optuna
import pandas as pd
import pytest

from momkit.cli import main


def _spawn(spec, url, cwd, *extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "momkit", "sweep", str(spec), "--storage", url, *extra], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _ran(output: str) -> list[int]:
    found = re.findall(r"this command ran trials? ([\d, ]+)", output)
    return [int(n) for n in found[0].split(", ")] if found else []


def test_two_workers_on_postgres_run_every_trial_exactly_once(tmp_path, make_spec, postgres_url):
    spec = make_spec(tmp_path / "pg_two.yaml", space={"optim.lr": {"type": "float", "low": 1e-3, "high": 3e-2,
                                                                   "log": True}},
                     sampler={"name": "tpe", "seed": 0, "startup_trials": 2}, budget={"trials": 6})
    workers = [_spawn(spec, postgres_url, tmp_path) for _ in range(2)]  # both race to create the study
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    assert sum("created with 6 queued trials" in o for o in outputs) == 1, outputs  # exactly one creator
    ran = [_ran(o) for o in outputs]
    assert sorted(ran[0] + ran[1]) == list(range(6)), outputs  # every trial once, none twice, none lost

    study = optuna.load_study(study_name="pg_two", storage=postgres_url)
    trials = study.get_trials()
    assert [t.number for t in trials] == list(range(6))
    assert all(t.state.name == "COMPLETE" for t in trials)
    assert len({t.params["optim.lr"] for t in trials}) == 6
    by_worker = {}
    for t in trials:
        by_worker.setdefault(t.user_attrs["worker"], []).append(t.number)
    assert sorted(sorted(v) for v in by_worker.values()) == sorted(sorted(r) for r in ran if r)

    assert main(["sweep-report", "pg_two", "--storage", postgres_url, "--out", str(tmp_path / "report")]) == 0
    csv = pd.read_csv(tmp_path / "report" / "trials.csv")
    assert sorted(csv["number"]) == list(range(6)) and set(csv["state"]) == {"COMPLETE"}


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_killed_worker_is_detected_by_heartbeat_and_its_trial_retried(tmp_path, make_spec, momkit_cmd, request,
                                                                        capsys, backend):
    url = f"sqlite:///{tmp_path / 'kill.db'}" if backend == "sqlite" else request.getfixturevalue("postgres_url")
    study_name = f"kill_{backend}"
    # one trial of 60 steps: long enough to be killed in the middle of it
    spec = make_spec(tmp_path / "kill.yaml", study=study_name, space={"model.mom.num_memories": [2]},
                     overrides={"optim.max_steps": 60, "run.eval_every": 5, "run.checkpoint_every": 60})
    victim = _spawn(spec, url, tmp_path)
    metrics = tmp_path / "runs" / study_name / "trial-0000" / "seed-0" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and any('"valid"' in ln for ln in metrics.read_text().splitlines())):
        assert victim.poll() is None, victim.communicate()[0]
        assert time.monotonic() < deadline, "the trial never started training"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)  # mid-trial: it has evaluated at least once, and runs to 60 steps
    victim.wait()
    events = [json.loads(ln) for ln in metrics.read_text().splitlines()]
    assert not any(e.get("event") == "end" for e in events), "the victim finished before it was killed"
    study = optuna.load_study(study_name=study_name, storage=url)
    assert [t.state.name for t in study.get_trials()] == ["RUNNING"]  # the dead worker could not say anything

    # the same command again (another worker): it waits for the heartbeat to go stale, fails the trial, and the
    # retry callback queues it again with the same parameters
    out = momkit_cmd("sweep", spec, "--storage", url, cwd=tmp_path).stdout
    assert "FAIL" in out and "worker died (no heartbeat for 2 s); retried as trial 1" in out, out
    trials = optuna.load_study(study_name=study_name, storage=url).get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert trials[1].params == trials[0].params
    assert trials[1].system_attrs["failed_trial"] == 0 and trials[1].user_attrs["retry_of"] == 0
    assert "error" not in trials[1].user_attrs or trials[1].user_attrs["error"] is None
    assert _ran(out) == [1]

    capsys.readouterr()
    assert main(["sweep-report", study_name, "--storage", url, "--out", str(tmp_path / "rep")]) == 0
    report = capsys.readouterr().out
    assert re.search(r"2 trials \(budget 1\): 1 (complete|fail), 1 (fail|complete)", report), report
    csv = pd.read_csv(tmp_path / "rep" / "trials.csv").set_index("number")
    assert csv.loc[0, "state"] == "FAIL" and csv.loc[0, "message"] == "worker died (no heartbeat)"
    assert csv.loc[0, "retried_as"] == 1 and csv.loc[1, "retry_of"] == 0


def test_a_retried_trial_keeps_the_seeds_its_killed_attempt_finished(tmp_path, make_spec, momkit_cmd):
    """Seeds run one after another; a worker killed during seed 1 has finished seed 0, whose outcome the retry
    reuses (same config, same objective, the first attempt's run directory) while seed 1 trains again."""
    url = f"sqlite:///{tmp_path / 'seeds.db'}"
    spec = make_spec(tmp_path / "seeds.yaml", study="seeds", space={"model.mom.num_memories": [2]}, seeds=[0, 1],
                     overrides={"optim.max_steps": 60, "run.eval_every": 5, "run.checkpoint_every": 60})
    victim = _spawn(spec, url, tmp_path)
    first = tmp_path / "runs" / "seeds" / "trial-0000"
    deadline = time.monotonic() + 180
    while not ((first / "seed-1" / "metrics.jsonl").is_file()
               and '"valid"' in (first / "seed-1" / "metrics.jsonl").read_text()):
        assert victim.poll() is None, victim.communicate()[0]
        assert time.monotonic() < deadline, "seed 1 never started training"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed = optuna.load_study(study_name="seeds", storage=url).get_trials()[0]
    assert list(killed.user_attrs["seeds_done"]) == ["0"]  # seed 0 was stored when it finished, seed 1 not

    out = momkit_cmd("sweep", spec, "--storage", url, cwd=tmp_path).stdout
    assert "retried as trial 1" in out, out
    trials = optuna.load_study(study_name="seeds", storage=url).get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    retry = trials[1]
    assert retry.user_attrs["objective_per_seed"][0] == killed.user_attrs["seeds_done"]["0"]["value"]
    assert retry.user_attrs["run_dirs"] == [str(first / "seed-0"), str(tmp_path / "runs/seeds/trial-0001/seed-1")]
    assert not (tmp_path / "runs" / "seeds" / "trial-0001" / "seed-0").exists()  # seed 0 did not train again
    assert (tmp_path / "runs" / "seeds" / "trial-0001" / "seed-1" / "metrics.jsonl").is_file()
    assert retry.value == pytest.approx(sum(retry.user_attrs["objective_per_seed"]) / 2)


def test_a_retried_trial_continues_the_seed_its_killed_attempt_was_training(tmp_path, make_spec, momkit_cmd):
    """A worker killed during a seed after that run wrote a checkpoint: the retry continues the run in its
    directory from the checkpoint (no new run directory), and the seed ends as an uninterrupted run does."""
    import torch

    from momkit.sweep.spec import load_spec
    from momkit.train import train

    url = f"sqlite:///{tmp_path / 'cont.db'}"
    spec = make_spec(tmp_path / "cont.yaml", study="cont", space={"model.mom.num_memories": [2]}, seeds=[0],
                     overrides={"optim.max_steps": 60, "run.eval_every": 5, "run.checkpoint_every": 10})
    victim = _spawn(spec, url, tmp_path)
    run = tmp_path / "runs" / "cont" / "trial-0000" / "seed-0"
    deadline = time.monotonic() + 180
    metrics = run / "metrics.jsonl"
    while not (metrics.is_file() and '"step": 25, "split": "valid"' in metrics.read_text()):
        assert victim.poll() is None, victim.communicate()[0]
        assert time.monotonic() < deadline, "the run never reached step 25"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    stopped_at = torch.load(run / "last.pt", weights_only=False)["state"]["step"]
    assert 20 <= stopped_at < 60

    out = momkit_cmd("sweep", spec, "--storage", url, cwd=tmp_path).stdout
    assert "retried as trial 1" in out, out
    trials = optuna.load_study(study_name="cont", storage=url).get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    retry = trials[1]
    assert retry.user_attrs["run_dirs"] == [str(run)]
    assert not (tmp_path / "runs" / "cont" / "trial-0001").exists()
    valid = [json.loads(line)["step"] for line in metrics.read_text().splitlines()
             if '"split": "valid"' in line]
    assert valid == list(range(5, 65, 5))  # every evaluation once: the resumed run wrote on from the checkpoint

    cfg = load_spec(str(spec)).trial_config("cont", 0, {"model.mom.num_memories": 2}, 0)
    cfg.run.dir = str(tmp_path / "uninterrupted")
    metric = "valid/accuracy"
    cfg.run.best_metric, cfg.run.best_mode = metric, "max"  # as the runner sets them: the objective's best
    whole = train(cfg)
    resumed = [json.loads(line) for line in metrics.read_text().splitlines() if '"split": "valid"' in line]
    assert [(e["step"], e[metric], e["valid/loss"]) for e in resumed] == \
        [(e["step"], e[metric], e["valid/loss"]) for e in whole.history if e.get("split") == "valid"]
    assert retry.user_attrs["seeds_done"]["0"]["evaluation"][metric] == whole.best[metric]


@pytest.mark.parametrize("driver", ["", "+psycopg", "+psycopg2"])
def test_every_postgresql_url_form_opens(postgres_url, driver):
    """postgresql:// (docs/sweeps.md) and both explicit drivers reach the same server."""
    from momkit.sweep.storage import open_storage, study_names

    assert postgres_url.startswith("postgresql://")
    url = postgres_url.replace("postgresql://", f"postgresql{driver}://", 1)
    assert isinstance(study_names(open_storage(url)), list)


def test_a_retried_trial_is_claimed_before_fresh_ones(tmp_path):
    """A job cut short queues its trials again behind the fresh ones; the next job takes those retries first, so
    the seeds they finished and the checkpoints they left are built on before anything new starts."""
    from momkit.sweep.runner import _claim
    from momkit.sweep.storage import retry_callback

    url = f"sqlite:///{tmp_path / 'claim.db'}"
    study = optuna.create_study(study_name="claim", storage=url)
    for lr in (1e-3, 3e-3, 1e-2):
        study.enqueue_trial({"lr": lr})
    storage = optuna.storages.get_storage(url)
    study_id = storage.get_study_id_from_name("claim")
    first_id, first = _claim(storage, study_id)
    assert first.number == 0
    failed = storage.set_trial_state_values(first_id, state=optuna.trial.TrialState.FAIL)
    assert failed
    retry_callback(3)(study, study.get_trials()[0])  # queued again, behind trials 1 and 2
    waiting = [t.number for t in study.get_trials(states=(optuna.trial.TrialState.WAITING,))]
    assert waiting == [1, 2, 3]
    _, claimed = _claim(storage, study_id)
    assert claimed.number == 3 and claimed.system_attrs["failed_trial"] == 0
    assert [_claim(storage, study_id)[1].number for _ in range(2)] == [1, 2]
