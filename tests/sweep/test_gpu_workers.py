"""Sweep workers on GPUs: how many local workers start and which GPU each is pinned to (``--workers``,
``--gpus``, ``--workers-per-gpu``), checked on CPU with the visible GPUs given."""

from __future__ import annotations

import pytest

from momkit.cli import main
from momkit.config import ConfigError
from momkit.sweep import runner
from momkit.sweep.workers import plan_workers, worker_env

PLANS = [  # (visible GPUs, workers, gpus, workers_per_gpu) -> (workers, GPU of each worker)
    (([], None, None, None), (1, [])),
    (([], 3, None, None), (3, [])),
    ((["0", "1"], None, None, None), (2, ["0", "1"])),
    ((["0", "1"], 1, None, None), (1, ["0"])),
    ((["0"], 3, None, None), (3, ["0", "0", "0"])),  # --workers alone: as many per GPU as it takes
    ((["0", "1"], None, None, 2), (4, ["0", "1", "0", "1"])),
    ((["0", "1"], 3, "0,1", 2), (3, ["0", "1", "0"])),
    ((["0", "1", "2", "3"], None, "3, 1", None), (2, ["3", "1"])),
    ((["0", "1", "2", "3"], None, "2", 3), (3, ["2", "2", "2"])),
    ((["2", "5"], None, "5", None), (1, ["5"])),  # CUDA_VISIBLE_DEVICES=2,5: ids as the machine names them
]


@pytest.mark.parametrize(("args", "plan"), PLANS, ids=[str(a) for a, _ in PLANS])
def test_workers_are_assigned_round_robin_over_the_chosen_gpus(args, plan):
    assert plan_workers(*args) == plan
    n, devices = plan
    assert [worker_env(i, devices, None).get("CUDA_VISIBLE_DEVICES") for i in range(n)] == \
        (devices or [worker_env(0, [], None).get("CUDA_VISIBLE_DEVICES")] * n)


BAD = [
    (([], None, "0", None), r"--gpus='0' is invalid: no CUDA GPU is visible on this machine"),
    ((["0", "1"], None, "0,7", None), r"--gpus='0,7' is invalid: GPU 7 is not visible here \(visible: 0, 1;"),
    ((["0", "1"], None, "-1", None), r"--gpus='-1' is invalid: GPU -1 is not visible here"),
    ((["0", "1"], None, "0,,1", None), r"--gpus='0,,1' is invalid: a comma-separated list of GPU ids is expected"),
    ((["0", "1"], None, "1,1", None), r"--gpus='1,1' is invalid: a GPU is named twice .*--workers-per-gpu"),
    ((["0", "1"], -2, None, None), r"--workers=-2 is invalid: must be an int >= 1"),
    ((["0", "1"], None, None, 0), r"--workers-per-gpu=0 is invalid: must be an int >= 1"),
    ((["0", "1"], None, None, -1), r"--workers-per-gpu=-1 is invalid: must be an int >= 1"),
    ((["0", "1"], 5, None, 2), r"--workers=5 is invalid: 2 GPUs \(0, 1\) with --workers-per-gpu=2 take at most 4 "
                               r"workers; raise --workers-per-gpu to 3 or name more --gpus"),
    (([], None, None, 2), r"--workers-per-gpu=2 is invalid: no CUDA GPU is visible on this machine"),
]


@pytest.mark.parametrize(("args", "message"), BAD, ids=[m[:40] for _, m in BAD])
def test_bad_worker_options_are_one_clear_error(args, message):
    with pytest.raises(ConfigError, match=message):
        plan_workers(*args)


@pytest.mark.parametrize(("argv", "message"), [
    (["--gpus", "0"], "--gpus='0' is invalid: no CUDA GPU is visible on this machine"),
    (["--workers-per-gpu", "-1"], "--workers-per-gpu=-1 is invalid: must be an int >= 1"),
])
def test_the_command_reports_bad_gpu_options_before_any_work(tmp_path, make_spec, capsys, monkeypatch, argv,
                                                             message):
    monkeypatch.setattr(runner, "_devices", lambda: [])  # a CPU machine, whatever this one has
    spec = make_spec(tmp_path / "g.yaml")
    db = tmp_path / "g.db"
    assert main(["sweep", str(spec), "--storage", f"sqlite:///{db}", *argv]) == 2
    err = capsys.readouterr().err
    assert err == f"momkit: error: {message}\n"
    assert not db.exists() and not (tmp_path / "runs").exists()


def test_a_local_worker_process_is_pinned_to_its_gpu(tmp_path, make_spec, capsys, monkeypatch):
    """Two visible GPUs (named here; the worker still trains on CPU) and ``--gpus 1``: one child process, started
    with CUDA_VISIBLE_DEVICES=1, runs the study's trials (the command's own process sees both GPUs)."""
    monkeypatch.setattr(runner, "_devices", lambda: ["0", "1"])
    started = []
    popen = runner.subprocess.Popen

    def record(cmd, *args, env=None, **kw):
        if "--worker-index" not in cmd:  # another library's subprocess
            return popen(cmd, *args, env=env, **kw)
        started.append((cmd[cmd.index("--worker-index") + 1], env["CUDA_VISIBLE_DEVICES"]))
        return popen(cmd, *args, env={**env, "CUDA_VISIBLE_DEVICES": ""}, **kw)  # no GPU here: train on CPU

    monkeypatch.setattr(runner.subprocess, "Popen", record)
    spec = make_spec(tmp_path / "pin.yaml")
    status = main(["sweep", str(spec), "--storage", f"sqlite:///{tmp_path / 'pin.db'}", "--gpus", "1"])
    out = capsys.readouterr().out
    logs = "".join(p.read_text() for p in sorted((tmp_path / "runs" / "pin" / "workers").glob("*.log")))
    assert status == 0, out + logs
    assert started == [("0", "1")]
    assert "1 worker here (worker 0 -> GPU 1)" in out
    assert "2 complete" in out


def test_mps_workers_share_one_daemon_started_and_stopped_by_the_command(tmp_path, make_spec, capsys, monkeypatch):
    """``--workers 2 --mps`` on one (named) GPU: the command starts CUDA's MPS control daemon (a stand-in here) with
    its folders under the study's runs, both workers get its pipe folder and a share of the cores, and the daemon
    is told to quit once they are done."""
    import os

    from momkit.sweep.workers import MPS_CONTROL

    monkeypatch.setattr(runner, "_devices", lambda: ["0"])
    monkeypatch.setattr(runner, "_cpu_count", lambda: 4)
    bin_dir, log = tmp_path / "bin", tmp_path / "mps.log"
    bin_dir.mkdir()
    (bin_dir / MPS_CONTROL).write_text(f'#!/bin/sh\necho "$* $(cat)" >> "{log}"\n')
    (bin_dir / MPS_CONTROL).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    started = []
    popen = runner.subprocess.Popen

    def record(cmd, *args, env=None, **kw):
        if "--worker-index" not in cmd:
            return popen(cmd, *args, env=env, **kw)
        started.append((env["CUDA_VISIBLE_DEVICES"], env["CUDA_MPS_PIPE_DIRECTORY"], env["OMP_NUM_THREADS"]))
        return popen(cmd, *args, env={**env, "CUDA_VISIBLE_DEVICES": ""}, **kw)  # no GPU here: train on CPU

    monkeypatch.setattr(runner.subprocess, "Popen", record)
    spec = make_spec(tmp_path / "mps.yaml")
    status = main(["sweep", str(spec), "--storage", f"sqlite:///{tmp_path / 'mps.db'}", "--workers", "2", "--mps"])
    out = capsys.readouterr().out
    pipe = str(tmp_path / "runs" / "mps" / "mps" / "pipe")
    assert status == 0, out
    assert sorted(started) == [("0", pipe, "2"), ("0", pipe, "2")]
    assert "2 workers here (worker 0 -> GPU 0, worker 1 -> GPU 0, MPS)" in out and "2 complete" in out
    assert log.read_text().splitlines() == ["-d ", " quit"]
