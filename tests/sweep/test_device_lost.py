"""A trial that breaks its worker's GPU (a sticky CUDA error: every later call in the process fails) must cost
that trial only: the worker stops instead of failing every trial it would claim next, and a local worker is
replaced by a fresh process. Checked on CPU with the fault simulated: the first trial of the sweep raises a
CUDA error, and from then on its process behaves as a broken CUDA context does (every training call and the
device check fail)."""

from __future__ import annotations

import optuna
import pytest

from momkit.cli import main
from momkit.sweep import runner

ILLEGAL = "CUDA error: an illegal memory access was encountered"

# loaded at start-up by every worker process (sitecustomize.py on PYTHONPATH): the simulated broken context
HOOK = f'''
import os
from pathlib import Path

import momkit.sweep.runner as r

_lost = []
_train_seed = r._train_seed


def faulty(cfg, *args, **kw):
    first = Path(os.environ["FAULT_MARKER"])
    if _lost or not first.exists():  # the sweep's first trial breaks the context of its process
        first.touch()
        _lost.append(1)
        raise RuntimeError({ILLEGAL!r})
    return _train_seed(cfg, *args, **kw)


r._train_seed = faulty
r._device_lost = lambda cfg: ("AcceleratorError: " + {ILLEGAL!r}) if _lost else None
'''


def _states(db) -> dict[int, tuple[str, str | None]]:
    study = optuna.load_study(study_name="lost", storage=f"sqlite:///{db}")
    return {t.number: (t.state.name, t.user_attrs.get("error")) for t in study.trials}


def test_a_local_worker_whose_gpu_breaks_is_replaced_and_the_other_trials_run(tmp_path, make_spec, capsys,
                                                                              monkeypatch):
    """One worker process (``--gpus 1`` of two visible GPUs, training on CPU) runs a grid of three trials; the
    first breaks its context. The worker exits with EXIT_DEVICE_LOST, a fresh one runs the other two (the old
    worker would have failed them both)."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK)
    monkeypatch.setattr(runner, "_devices", lambda: ["0", "1"])
    popen = runner.subprocess.Popen
    started = []

    def record(cmd, *args, env=None, **kw):
        if "--worker-index" not in cmd:  # another library's subprocess
            return popen(cmd, *args, env=env, **kw)
        started.append(cmd[cmd.index("--worker-index") + 1])
        path = ":".join(p for p in (str(hook), env.get("PYTHONPATH")) if p)
        return popen(cmd, *args, env={**env, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": path,
                                      "FAULT_MARKER": str(tmp_path / "faulted")}, **kw)

    monkeypatch.setattr(runner.subprocess, "Popen", record)
    spec = make_spec(tmp_path / "lost.yaml", space={"model.mom.num_memories": [1, 2, 3]})
    db = tmp_path / "lost.db"
    status = main(["sweep", str(spec), "--storage", f"sqlite:///{db}", "--gpus", "1", "--study", "lost"])
    out = capsys.readouterr().out
    log = (tmp_path / "runs" / "lost" / "workers" / "worker-0.log").read_text()
    assert status == 0, out + log
    states = _states(db)
    failed = [n for n, (s, _) in states.items() if s == "FAIL"]
    assert len(failed) == 1 and sorted(s for s, _ in states.values()) == ["COMPLETE", "COMPLETE", "FAIL"], states
    assert states[failed[0]][1] == f"RuntimeError: {ILLEGAL}"
    assert started == ["0", "0"]  # the worker, then its replacement
    assert "worker 0 stopped: a trial left its GPU unusable" in out
    assert f"momkit: worker stopped: trial {failed[0]} failed with RuntimeError: {ILLEGAL}" in log
    assert "the GPU no longer works in this process (AcceleratorError: " in log


def test_a_sweep_in_this_process_stops_at_a_broken_gpu_and_resumes(tmp_path, make_spec, capsys, monkeypatch):
    """Trials in the command's own process: the faulting trial fails, the command stops with one clear error
    and the trial after it stays queued; the same command run again (a new process) runs it."""
    spec = make_spec(tmp_path / "lost.yaml", space={"model.mom.num_memories": [2, 1]})
    db = tmp_path / "lost.db"
    argv = ["sweep", str(spec), "--storage", f"sqlite:///{db}", "--study", "lost"]
    lost = []

    def faulty(cfg, *args, **kw):
        lost.append(1)
        raise RuntimeError(ILLEGAL)

    with monkeypatch.context() as m:
        m.setattr(runner, "_train_seed", faulty)
        m.setattr(runner, "_device_lost", lambda cfg: "AcceleratorError: " + ILLEGAL if lost else None)
        assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("momkit: sweep stopped: trial 0 failed with RuntimeError: " + ILLEGAL), err
    assert err.rstrip().endswith("run the same command again to continue them")
    assert len(err.strip().splitlines()) == 1
    assert _states(db) == {0: ("FAIL", f"RuntimeError: {ILLEGAL}"), 1: ("WAITING", None)}
    assert main(argv) == 0
    assert _states(db)[1][0] == "COMPLETE"


def test_a_trial_on_the_cpu_never_reports_a_lost_device():
    from momkit.config import load_config

    assert runner._device_lost(load_config("mqar_tiny", ["run.device=cpu"])) is None


@pytest.mark.gpu
def test_a_working_gpu_is_not_reported_lost():
    from momkit.config import load_config

    assert runner._device_lost(load_config("mqar_tiny", ["run.device=cuda"])) is None
