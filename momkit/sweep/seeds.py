"""A trial's seeds: the key of a seed's resolved config, its outcome as the storage keeps it, a finished seed found
in another trial, a run to continue, and the seeds trained side by side (``momkit sweep --parallel-seeds``): one
child process per seed, on the worker's device. A study with fewer trials left than the machine has room for (the
capacity protocol's small models, three seeds each) then fills it, and a trial takes the time of its slowest seed
rather than the sum."""

from __future__ import annotations

import dataclasses
import hashlib
import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any


class SeedTimeout(Exception):
    """A seed is left to train after the worker's timeout: the trial is queued again."""

    def __init__(self, seed: str):
        super().__init__(f"timeout before seed {seed}")
        self.seed = seed


def config_key(cfg) -> str:
    """A digest of a seed's resolved config, less what names the run (its name and directory hold the trial
    number) and the worker's CPU threads: a finished seed is reused only for the same config."""
    from momkit.config import config_to_yaml

    same = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name="", dir=None, threads=None, progress=False))
    return hashlib.sha256(config_to_yaml(same).encode()).hexdigest()[:16]


def trained_elsewhere(storage, key: str, source: str, study_name: str, number: int) -> dict | None:
    """The outcome of a seed that another trial, of this study or another in the same storage, finished with the
    same resolved config (``key``, see ``config_key``: the objective's metric and direction are part of it) and
    evaluation (``source``), marked with where it came from (``reused_from``); None where no trial has one. Studies
    that share cells (the capacity protocol's baselines) then train each cell once."""
    if storage is None:
        return None
    for summary in storage.get_all_studies():
        for t in storage.get_all_trials(storage.get_study_id_from_name(summary.study_name), deepcopy=False):
            if summary.study_name == study_name and t.number == number:
                continue
            for seed, outcome in (t.user_attrs.get("seeds_done") or {}).items():
                if outcome.get("config_key") == key and outcome.get("source", "best") == source:
                    return outcome if "reused_from" in outcome else \
                        {**outcome, "reused_from": f"{summary.study_name} trial {t.number} seed {seed}"}
    return None


def prepare_seed(spec, cfg, done: dict, seed: str, storage, study_name: str, number: int) -> tuple[str, dict | None]:
    """Set ``cfg`` to keep its best evaluation by the objective, and return its config key with the outcome it
    already has: this trial's earlier attempt's (``done``), else another trial's with the same config, else None."""
    cfg.run.best_metric = spec.objective.metric  # RunResult.best is then best by the objective
    cfg.run.best_mode = "max" if spec.objective.direction == "maximize" else "min"
    key = config_key(cfg)
    outcome = done.get(seed)
    if outcome is None or outcome["config_key"] != key:
        outcome = trained_elsewhere(storage, key, spec.objective.source, study_name, number)
    return key, outcome


def outcome_of(spec, result, key: str) -> dict:
    """What the storage keeps of one seed's run (``seeds_done``)."""
    return {"value": spec.objective.read(result), "config_key": key, "run_dir": result.run_dir,
            "steps": result.steps, "stopped": result.stopped, "elapsed_s": result.elapsed_s,
            "source": spec.objective.source,
            "evaluation": result.best if spec.objective.source == "best" else result.final}


def resumable(started: dict, seed: str, key: str) -> str | None:
    """The run directory an earlier attempt of the trial trained ``seed`` in with the same config (``key``) and
    left a checkpoint in, or None."""
    before = started.get(seed)
    if before is not None and before["config_key"] == key and (Path(before["run_dir"]) / "last.pt").is_file():
        return before["run_dir"]
    return None


def _train_one(cfg, resume_from: str | None, conn) -> None:
    """In a child process: train one seed, continuing the run in ``resume_from`` where given (a run that cannot go
    on is started afresh in ``cfg.run.dir``, as a sequential trial does), and send ``("ok", RunResult, refused)``
    or ``("error", message, refused)``; ``refused`` is why a resume was refused, else None."""
    refused = None
    try:
        from momkit.config import ConfigError
        from momkit.runtime import tune_cpu
        from momkit.train import train

        tune_cpu()
        result = None
        if resume_from is not None:
            fresh, cfg.run.dir = cfg.run.dir, resume_from
            try:
                result = train(cfg, resume=True)
            except ConfigError as e:
                refused, cfg.run.dir = str(e), fresh
        if result is None:
            result = train(cfg, overwrite=True)
        conn.send(("ok", result, refused))
    except KeyboardInterrupt:
        conn.send(("error", "interrupted", refused))
    except BaseException as e:  # everything goes back to the worker, which fails the trial
        conn.send(("error", f"{type(e).__name__}: {e}", refused))
    finally:
        conn.close()


def train_side_by_side(jobs: list[tuple[str, Any, str | None]],
                       on_result: Callable[[str, Any, str | None], None]) -> list[str]:
    """Train every ``(seed, cfg, resume_from)`` of ``jobs`` at once, each in a child process; call
    ``on_result(seed, RunResult, refused)`` as each one finishes, and return the errors of those that failed
    (``"seed S: message"``). A Ctrl-C (or the job's SIGINT) passes to the children, which are stopped."""
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no CUDA state inherited from the worker
    running: dict[Any, tuple[str, Any]] = {}
    errors: list[str] = []
    try:
        for seed, cfg, resume_from in jobs:
            recv, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_train_one, args=(cfg, resume_from, send), name=f"seed-{seed}")
            proc.start()
            send.close()
            running[recv] = (seed, proc)
        while running:
            for conn in wait(list(running)):
                seed, proc = running.pop(conn)
                try:
                    status, payload, refused = conn.recv()
                except EOFError:
                    status, refused = "error", None
                    payload = f"its process ended (status {proc.exitcode}) without a result"
                conn.close()
                proc.join()
                if status == "ok":
                    on_result(seed, payload, refused)
                else:
                    errors.append(f"seed {seed}: {payload}")
    except BaseException:
        for _, proc in running.values():
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGINT)
        for _, proc in running.values():
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
        raise
    return errors


def seeds_side_by_side(spec, study_name: str, trial, params: dict, first_cfg, threads: int | None, storage,
                       deadline: float | None, done: dict, started: dict) -> list[dict]:
    """The outcomes of every seed of a trial, those it lacks trained at once, one child process each
    (``--parallel-seeds``); ``SeedTimeout`` where one is left to train past ``deadline`` (the worker's timeout,
    in ``time.monotonic()``). As in the sequential loop, a seed finished before (by this trial's earlier attempt
    or another trial with the same config) is reused, a seed cut short goes on from its checkpoint, and each
    outcome is stored as it arrives."""
    number = trial.number
    cfgs, keys, outcomes = {}, {}, {}
    for i, seed in enumerate(map(str, spec.seeds)):
        cfg = first_cfg if i == 0 else spec.trial_config(study_name, number, params, int(seed), threads)
        cfgs[seed] = cfg
        keys[seed], outcomes[seed] = prepare_seed(spec, cfg, done, seed, storage, study_name, number)
    todo = [seed for seed, o in outcomes.items() if o is None]
    if todo and deadline is not None and time.monotonic() > deadline:
        raise SeedTimeout(todo[0])
    for seed, o in outcomes.items():
        if o is not None and done.get(seed) is not o:
            done[seed] = o
    jobs = []
    for seed in todo:
        resume_from = resumable(started, seed, keys[seed])
        if resume_from is None:
            started[seed] = {"run_dir": str(cfgs[seed].run_dir), "config_key": keys[seed]}
        jobs.append((seed, cfgs[seed], resume_from))
    trial.set_user_attr("seeds_started", started)
    trial.set_user_attr("seeds_done", done)

    def finished(seed: str, result, refused: str | None) -> None:
        if refused is not None:  # the earlier run could not go on: this seed trained afresh
            trial.set_user_attr(f"resume_refused_seed_{seed}", refused)
            started[seed] = {"run_dir": str(result.run_dir), "config_key": keys[seed]}
            trial.set_user_attr("seeds_started", started)
        outcomes[seed] = done[seed] = outcome_of(spec, result, keys[seed])
        trial.set_user_attr("seeds_done", done)

    errors = train_side_by_side(jobs, finished)
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(jobs)} seeds failed: " + "; ".join(errors))
    return [outcomes[str(seed)] for seed in spec.seeds]
