"""The sweep runner: a study of queued trials and workers that claim and run them (progress lines: progress.py).

How a study is run, on one machine or many:

* **The queue.** The process that creates the study (Optuna's unique study name decides which one) queues
  the whole budget as WAITING trials: every valid grid point with its parameters fixed, or, for TPE and
  random sampling, empty trials whose parameters are sampled when a worker claims them. A worker claims a
  trial by moving it from WAITING to RUNNING, which the storage does atomically, so every queued trial runs
  exactly once however many workers share the study, and a budget is never overrun.
* **A trial.** Its parameters (suggested through Optuna, so samplers, pruners and optuna-dashboard see them)
  become dotted overrides of the spec's base config; ``train()`` runs once per seed, one seed after another
  or, with ``parallel_seeds``, all at once in child processes (``seeds.py``); the evaluation metrics of the
  first seed are reported for pruning (in turn only); the objective is the mean over seeds. The resolved
  config, the run directory, the per-seed objectives, the metrics and routing telemetry are stored as user
  attributes; a failed trial keeps its error message.
* **Dead workers.** On SQL storages a running trial records a heartbeat every ``heartbeat.interval`` seconds;
  a live worker fails trials whose heartbeat is older than ``heartbeat.grace_period`` and Optuna's retry
  callback queues them again with the same parameters (at most ``heartbeat.max_retry`` times). Idle workers
  wait while other trials are running, so a retried trial is picked up. Each seed's outcome is stored as it
  finishes (``seeds_done``), and a retry keeps the seeds its failed attempt finished with the same config: a
  trial cut short (a killed worker, a job's time limit) only trains the seeds it had not finished, and the
  seed it was training goes on from that run's last checkpoint where the run directory is at hand.
* **A lost GPU.** Some CUDA errors (an illegal memory access, a device-side assert) are sticky: every later
  call in the process fails. After a failed trial a worker checks its GPU; if it no longer works, the trial
  stays failed with its error and the worker stops (``DeviceLost``) instead of failing every trial it would
  claim next. A local worker started by ``momkit sweep`` is replaced by a fresh process, which has a working
  GPU; the trials it had not claimed stay queued.
* **Resuming.** Running the same command again continues the study: queued trials run, finished ones are
  kept. A larger ``--n-trials`` queues more.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from momkit.config import ConfigError
from momkit.sweep.progress import Monitor, fmt_value, short_names, trial_line
from momkit.sweep.seeds import SeedTimeout, outcome_of, prepare_seed, resumable, seeds_side_by_side
from momkit.sweep.spec import SweepSpec, check_study_name
from momkit.sweep.storage import (
    DEFAULT_STORAGE,
    claim_lock,
    describe,
    heartbeat_enabled,
    open_storage,
    retried_as,
    retry_callback,
)
from momkit.sweep.workers import _cpu_count, _devices, mps_daemon, plan_workers, worker_command, worker_env

SPEC_ATTR = "momkit_spec"
CLAIMS_ATTR = "momkit_claims"  # the latest spec's claims (not part of the fingerprint: editing them is fine)
BUDGET_ATTR = "momkit_budget"
RUNS_DIR_ATTR = "momkit_runs_dir"
_READY_WAIT_S = 60.0
EXIT_DEVICE_LOST = 75  # a worker's exit status after DeviceLost: its parent starts a fresh one in its place


class DeviceLost(RuntimeError):
    """A trial left this process's GPU unusable: the worker must stop (a fresh process has a working one)."""


def _optuna():
    import optuna

    return optuna


@contextlib.contextmanager
def _quiet_experimental():
    from optuna.exceptions import ExperimentalWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        yield


def make_sampler(spec: SweepSpec, trial_number: int = 0):
    """The spec's sampler, seeded per trial: trial n draws the same values whichever worker runs it."""
    optuna = _optuna()
    seed = (spec.sampler.seed * 1_000_003 + trial_number) % 2**32
    if spec.sampler.name == "tpe":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # constant_liar is experimental
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=spec.sampler.startup_trials,
                                              constant_liar=True)
    return optuna.samplers.RandomSampler(seed=seed)  # random; grid trials have every parameter fixed


def make_pruner(spec: SweepSpec):
    optuna = _optuna()
    p = spec.pruner
    if p.name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.startup_trials, n_warmup_steps=p.warmup_steps,
                                           interval_steps=p.interval_steps)
    if p.name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=p.min_resource, max_resource=p.max_resource,
                                              reduction_factor=p.reduction_factor)
    return optuna.pruners.NopPruner()


def _normalise(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


# ------------------------------------------------------------------------------------------ the study
def _queue(study, spec: SweepSpec, n: int) -> int:
    """Queue ``n`` more trials: the grid points not in the study yet, or empty trials to be sampled."""
    if n <= 0:
        return 0
    if spec.is_grid:
        present = []
        for t in study.get_trials(deepcopy=False):
            present.append(_normalise(t.system_attrs.get("fixed_params") or t.params))
        todo = [p for p in spec.grid if _normalise(p) not in present][:n]
        for point in todo:
            study.enqueue_trial(point)
        return len(todo)
    for _ in range(n):
        study.enqueue_trial({})
    return n


def prepare_study(spec: SweepSpec, storage, study_name: str, n_trials: int | None = None) -> tuple[Any, str]:
    """Create the study and queue its budget, or load it and check it was made from the same spec
    (queueing more trials when the budget grew). Returns (study, a line saying what happened)."""
    optuna = _optuna()
    n = spec.n_trials(n_trials)
    try:
        study = optuna.create_study(storage=storage, study_name=study_name, direction=spec.objective.direction,
                                    load_if_exists=False)
    except optuna.exceptions.DuplicatedStudyError:
        study = None
    if study is not None:  # this process created it: record the spec, queue the budget, then mark it ready
        study.set_user_attr(SPEC_ATTR, _normalise(spec.fingerprint()))
        study.set_user_attr(CLAIMS_ATTR, _normalise(spec.claims))
        study.set_user_attr(RUNS_DIR_ATTR, spec.runs_dir)
        queued = _queue(study, spec, n)
        study.set_user_attr(BUDGET_ATTR, queued)
        return study, f"study {study_name!r}: created with {queued} queued trials"
    study = optuna.load_study(study_name=study_name, storage=storage)
    start = time.monotonic()
    while BUDGET_ATTR not in study.user_attrs:  # its creator is still queueing
        waited = time.monotonic() - start
        if waited > _READY_WAIT_S or (waited > 10 and SPEC_ATTR not in study.user_attrs):
            raise ConfigError(f"study {study_name!r} exists in {describe(_url_of(storage))} but was not set up by "
                              "momkit sweep (or its creator died while queueing); pick another --study or delete "
                              f"it: optuna delete-study --study-name {study_name} --storage URL")
        time.sleep(0.5)
    stored = study.user_attrs[SPEC_ATTR]
    mine = _normalise(spec.fingerprint())
    if stored != mine:
        changed = sorted(k for k in set(stored) | set(mine) if stored.get(k) != mine.get(k))
        raise ConfigError(f"study {study_name!r} was created from a different spec ({', '.join(changed)} changed); "
                          f"use --study NEW_NAME for a new study, or delete it: optuna delete-study --study-name "
                          f"{study_name} --storage URL")
    if study.user_attrs.get(CLAIMS_ATTR) != _normalise(spec.claims):
        study.set_user_attr(CLAIMS_ATTR, _normalise(spec.claims))
    budget = study.user_attrs[BUDGET_ATTR]
    if n > budget:
        added = _queue(study, spec, n - budget)
        study.set_user_attr(BUDGET_ATTR, budget + added)
        return study, f"study {study_name!r}: resumed; budget {budget} -> {budget + added} trials"
    return study, f"study {study_name!r}: resumed (budget {budget} trials)"


def _url_of(storage) -> str:
    url = getattr(storage, "url", None)
    return url if isinstance(url, str) else type(storage).__name__


# --------------------------------------------------------------------------------------------- a trial
@dataclass
class _Context:
    spec: SweepSpec
    study_name: str
    threads: int | None
    worker: str
    retry: Any  # the retry callback: also queues a trial interrupted by Ctrl-C
    storage: Any = None  # the study's storage, searched for seeds another trial or study already trained
    deadline: float | None = None  # time.monotonic() after which no seed starts (the worker's timeout)
    parallel_seeds: bool = False  # a trial's seeds trained side by side, one child process each (seeds.py)


class _HeartbeatThread:
    """Records the trial's heartbeat every ``interval`` seconds while the trial runs."""

    def __init__(self, storage, trial_id: int):
        self.storage, self.trial_id = storage, trial_id
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True, name=f"heartbeat-{trial_id}")

    def _beat(self):
        interval = self.storage.get_heartbeat_interval()
        while True:
            # a transient database error must not kill the trial; the next beat retries
            with contextlib.suppress(Exception):
                self.storage.record_heartbeat(self.trial_id)
            if self.stop.wait(interval):
                return

    def __enter__(self):
        if heartbeat_enabled(self.storage):
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()


def _mean_metrics(evaluations: list[dict]) -> dict:
    """Numeric metrics averaged over seeds; lists (``valid/load``) of the first seed."""
    out = {}
    for key, val in evaluations[0].items():
        if isinstance(val, (int, float)) and not isinstance(val, bool):
            vals = [e[key] for e in evaluations if isinstance(e.get(key), (int, float))]
            out[key] = sum(vals) / len(vals)
        else:
            out[key] = val
    return out


def _train_seed(cfg, key: str, callback, trial, started: dict, seed: str):
    """Train one seed of a trial. Where an earlier attempt of this trial trained the same config in a run
    directory that holds a checkpoint (``started[seed]``), continue that run (a resumed run trains on as if
    never stopped); otherwise start afresh. The run directory in use is stored (``seeds_started``) before
    training, so the next retry finds it."""
    from momkit.train import train

    before = resumable(started, seed, key)
    if before is not None:
        fresh_dir = cfg.run.dir
        cfg.run.dir = before
        trial.set_user_attr("seeds_started", started)
        try:
            return train(cfg, resume=True, callback=callback)
        except ConfigError as e:  # e.g. complete, or an unreadable checkpoint: that run cannot go on
            trial.set_user_attr(f"resume_refused_seed_{seed}", str(e))
            cfg.run.dir = fresh_dir
    started[seed] = {"run_dir": str(cfg.run_dir), "config_key": key}
    trial.set_user_attr("seeds_started", started)
    return train(cfg, overwrite=True, callback=callback)


def _queue_again(ctx: _Context, study, trial, why: str) -> None:
    """End the trial as failed and queue a retry of it (the seeds it finished kept)."""
    trial.set_user_attr("error", f"{why}; queued again")
    frozen = study.tell(trial, state=_optuna().trial.TrialState.FAIL)
    with _quiet_experimental():
        ctx.retry(study, frozen)


def _run_trial(ctx: _Context, study, trial, queued) -> str:
    """Run one claimed trial to its end and tell the study; returns its final state's name. ``queued`` is the
    FrozenTrial as it waited in the queue (a retry carries the attributes of the trial it replaces)."""
    optuna = _optuna()
    from momkit.config import config_to_yaml

    spec, number = ctx.spec, trial.number
    cfg = None
    # a retried trial inherits the user attributes of the one it replaces: reset its outcome
    for key in ("error", "pruned", "skipped", "objective_per_seed", "metrics"):
        if queued.user_attrs.get(key) is not None:
            trial.set_user_attr(key, None)
    trial.set_user_attr("worker", ctx.worker)
    retry_of = queued.system_attrs.get("failed_trial")
    if retry_of is not None:
        trial.set_user_attr("retry_of", retry_of)
    try:
        params = {name: p.suggest(trial) for name, p in spec.space.items()}
        try:
            cfg = spec.trial_config(ctx.study_name, number, params, spec.seeds[0], ctx.threads)
        except ConfigError as e:  # a sampled combination the config refuses: skip it, queue another
            trial.set_user_attr("skipped", str(e))
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            _replace_skipped(study, spec)
            return "SKIPPED"
        trial.set_user_attr("config", config_to_yaml(cfg))
        trial.set_user_attr("device", _device_label(cfg))
        trial.set_user_attr("run_dir", spec.run_dir(ctx.study_name, number))
        trial.set_user_attr("run_dirs", [spec.run_dir(ctx.study_name, number, s) for s in spec.seeds])
        trial.set_user_attr("seeds", spec.seeds)

        def report(step: int, metrics: dict) -> None:  # the first seed's learning curve goes to the pruner
            value = metrics.get(spec.objective.metric)
            if isinstance(value, (int, float)) and math.isfinite(value):
                trial.report(float(value), step)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned at step {step}: {spec.objective.metric}={value:.4g}")

        # seed -> outcome; a retry starts from the seeds its failed attempt finished, and continues the seed it
        # was training from that run's last checkpoint
        done = dict(queued.user_attrs.get("seeds_done") or {})
        started = dict(queued.user_attrs.get("seeds_started") or {})
        outcomes = []
        if ctx.parallel_seeds:
            try:
                outcomes = seeds_side_by_side(spec, ctx.study_name, trial, params, cfg, ctx.threads, ctx.storage,
                                              ctx.deadline, done, started)
            except SeedTimeout as e:  # past the worker's timeout: queued again, the seeds it finished kept
                _queue_again(ctx, study, trial, f"timeout before seed {e.seed}")
                return "FAIL"
        for i, seed in enumerate([] if ctx.parallel_seeds else spec.seeds):
            if i:
                cfg = spec.trial_config(ctx.study_name, number, params, seed, ctx.threads)
            key, outcome = prepare_seed(spec, cfg, done, str(seed), ctx.storage, ctx.study_name, number)
            if outcome is None and ctx.deadline is not None and time.monotonic() > ctx.deadline:
                # past the timeout a trial's seeds take longer than the job has left: queue it again, the
                # seeds it finished kept
                _queue_again(ctx, study, trial, f"timeout before seed {seed}")
                return "FAIL"
            if outcome is None:
                result = _train_seed(cfg, key, report if i == 0 else None, trial, started, str(seed))
                outcome = outcome_of(spec, result, key)
            if done.get(str(seed)) is not outcome:
                done[str(seed)] = outcome
                trial.set_user_attr("seeds_done", done)
            outcomes.append(outcome)
        trial.set_user_attr("run_dirs", [o["run_dir"] for o in outcomes])  # a reused seed's run is its first attempt's
        values = [o["value"] for o in outcomes]
        mean = sum(values) / len(values)
        if not math.isfinite(mean):
            raise ValueError(f"objective {spec.objective.metric} is {mean} (per seed: {values}), not a finite number")
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
        for key, val in {"objective_per_seed": values, "objective_std": std,
                         "metrics": _mean_metrics([o["evaluation"] for o in outcomes]),
                         "steps": [o["steps"] for o in outcomes], "stopped": [o["stopped"] for o in outcomes],
                         "train_s": round(sum(o["elapsed_s"] for o in outcomes), 2)}.items():
            trial.set_user_attr(key, val)
        study.tell(trial, mean)
        return "COMPLETE"
    except optuna.TrialPruned as e:
        trial.set_user_attr("pruned", str(e))
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        return "PRUNED"
    except KeyboardInterrupt:
        _queue_again(ctx, study, trial, "interrupted (Ctrl-C)")
        raise
    except Exception as e:
        message = f"{type(e).__name__}: {e}"
        trial.set_user_attr("error", message)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        lost = _device_lost(cfg) if cfg is not None else None
        if lost is not None:
            raise DeviceLost(f"trial {number} failed with {message.splitlines()[0]}, and the GPU no longer works in "
                             f"this process ({lost}): a CUDA error of this kind is sticky, so this worker stops; "
                             "the trials it had not claimed stay queued") from e
        return "FAIL"


def _device_lost(cfg) -> str | None:
    """Why the trial's GPU no longer works in this process (a sticky CUDA error), or None: it works, or the
    trial trained on the CPU."""
    from momkit.train.loop import device_lost, resolve_device

    try:
        device = resolve_device(cfg.run.device)
    except Exception:  # no device to check
        return None
    return device_lost(device)


def _device_label(cfg) -> str:
    """Where the trial trains, e.g. ``cuda:0 NVIDIA H100 (CUDA_VISIBLE_DEVICES=3)`` or ``cpu (2 threads)``."""
    import torch

    from momkit.train.loop import resolve_device

    device = resolve_device(cfg.run.device)
    if device.type == "cuda":
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} {torch.cuda.get_device_name(index)}" + \
            (f" (CUDA_VISIBLE_DEVICES={visible})" if visible else "")
    threads = cfg.run.threads or torch.get_num_threads()
    return f"cpu ({threads} thread{'s' if threads > 1 else ''})"


def _replace_skipped(study, spec: SweepSpec) -> None:
    """Queue a new trial for a skipped one, so the budget counts trials that trained (within a bound)."""
    skipped = sum(bool(t.user_attrs.get("skipped")) for t in study.get_trials(deepcopy=False))
    if skipped <= max(20, 2 * spec.n_trials()):
        study.enqueue_trial({})


def _claim(storage, study_id: int):
    """Move one WAITING trial to RUNNING (atomic in the storage): (trial id, its FrozenTrial as queued), or None
    if none is left. Retries of trials cut short come first: they carry the seeds their attempts finished and
    go on from the checkpoint of the seed they were training, so a job shorter than a trial still adds to them."""
    optuna = _optuna()
    waiting = storage.get_all_trials(study_id, deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
    waiting = sorted(waiting, key=lambda t: "failed_trial" not in t.system_attrs)  # stable: queue order otherwise
    for t in waiting:
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
        if heartbeat_enabled(storage):  # beat before claiming: a claimed trial is never without a heartbeat
            storage.record_heartbeat(trial_id)
        try:
            if storage.set_trial_state_values(trial_id, state=optuna.trial.TrialState.RUNNING):
                return trial_id, t
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    return None


def check_parallel_seeds(spec: SweepSpec, parallel_seeds: bool) -> None:
    """Seeds side by side leave the pruner nothing to judge while a trial runs: refuse the combination."""
    if parallel_seeds and len(spec.seeds) > 1 and spec.pruner.name != "none":
        raise ConfigError(f"--parallel-seeds is invalid with pruner: {spec.pruner.name} ({spec.path}): a pruner judges "
                          "the first seed's learning curve while the trial trains it; use pruner: {name: none}, or "
                          "train the seeds one after another")


def run_worker(spec: SweepSpec, storage_url: str, study_name: str, *, timeout: float | None = None,
               threads: int | None = None, parallel_seeds: bool = False) -> list[int]:
    """Claim and run queued trials of the study until none is left (or ``timeout`` seconds have passed: no
    trial, and no seed of a trial, starts after it; a trial with seeds left is queued again, keeping those it
    finished). Returns the numbers of the trials this worker ran."""
    start = time.monotonic()
    optuna = _optuna()
    from momkit.runtime import tune_cpu

    tune_cpu()  # allocator thresholds and flush-to-zero, before any tensor work (see momkit/runtime.py)
    retry = retry_callback(spec.heartbeat.max_retry)
    storage = open_storage(storage_url, heartbeat=spec.heartbeat, retry_callback=retry)
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        raise ConfigError(f"no study {study_name!r} in {describe(storage_url)}: a worker joins a study that "
                          "`momkit sweep` created") from None
    study_id = storage.get_study_id_from_name(study_name)
    check_parallel_seeds(spec, parallel_seeds)
    ctx = _Context(spec, study_name, threads, f"{socket.gethostname()}:{os.getpid()}", retry, storage,
                   None if timeout is None else start + timeout, parallel_seeds and len(spec.seeds) > 1)
    beating = heartbeat_enabled(storage)
    poll = min(5.0, spec.heartbeat.interval / 2)
    ran: list[int] = []
    while timeout is None or time.monotonic() - start < timeout:
        if beating:
            with _quiet_experimental():
                optuna.storages.fail_stale_trials(study)
        with claim_lock(storage_url):
            claimed = _claim(storage, study_id)
        if claimed is None:
            running = storage.get_all_trials(study_id, deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
            if beating and running:  # wait: a running trial whose worker dies is queued again
                time.sleep(poll)
                continue
            break
        trial_id, queued = claimed
        number = queued.number
        trial_study = optuna.load_study(study_name=study_name, storage=storage, sampler=make_sampler(spec, number),
                                        pruner=make_pruner(spec))
        trial_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))  # caches the claimed one
        with _HeartbeatThread(storage, trial_id):
            trial = optuna.trial.Trial(trial_study, trial_id)
            _run_trial(ctx, trial_study, trial, queued)
        ran.append(number)
    return ran


# ----------------------------------------------------------------------------------------- the command
@dataclass
class SweepSummary:
    study: str
    storage: str
    counts: dict[str, int]
    best: dict | None
    ran: list[int] = field(default_factory=list)  # trials run by this process (workers=1)
    worker_errors: list[str] = field(default_factory=list)
    first_error: str | None = None  # "trial N: message" of the first failed trial, if any failed


def retry_failed(storage, study_name: str) -> list[int]:
    """Queue again every failed trial that no retry replaces yet (an error, a worker that died after the job's
    retries ran out), with the seeds it finished kept, and return their numbers: after a fix, the cells a bug
    failed run again."""
    optuna = _optuna()
    study = optuna.load_study(study_name=study_name, storage=storage)
    trials = study.get_trials(deepcopy=False)
    retried = retried_as(trials)
    failed = [t for t in sorted(trials, key=lambda t: t.number)
              if t.state == optuna.trial.TrialState.FAIL and t.number not in retried]
    again = retry_callback(None)
    with _quiet_experimental():
        for t in failed:
            again(study, t)
    return [t.number for t in failed]


def summarize(spec: SweepSpec, storage, study_name: str) -> tuple[dict[str, int], dict | None, str | None]:
    """(trials per state, the best trial, "trial N: message" of the first failed trial that was not queued
    again, or None)."""
    optuna = _optuna()
    study = optuna.load_study(study_name=study_name, storage=storage)
    counts: dict[str, int] = {}
    first_error = None
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    retried = retried_as(trials)
    for t in trials:
        state = "SKIPPED" if t.user_attrs.get("skipped") else t.state.name
        counts[state] = counts.get(state, 0) + 1
        if state == "FAIL" and first_error is None and t.number not in retried:
            why = t.user_attrs.get("error") or f"worker died (no heartbeat for {spec.heartbeat.grace_period} s)"
            first_error = f"trial {t.number}: {why}"
    complete = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]
    best = None
    if complete:
        pick = max if spec.objective.direction == "maximize" else min
        b = pick(complete, key=lambda t: t.value)
        best = {"number": b.number, "value": b.value, "params": b.params,
                "std": b.user_attrs.get("objective_std", 0.0)}
    return counts, best, first_error


def run_sweep(spec: SweepSpec, storage_url: str | None = None, study_name: str | None = None, *,
              n_trials: int | None = None, workers: int | None = None, gpus: str | None = None,
              workers_per_gpu: int | None = None, timeout: float | None = None, mps: bool = False,
              retry: bool = False, parallel_seeds: bool = False, out: TextIO | None = None,
              progress_bar: bool | None = None) -> SweepSummary:
    """Run a sweep from this machine: create or resume the study, then run ``workers`` workers here (in this
    process when 1 and nothing needs pinning, else as child processes, each pinned to its GPU and all sharing
    the CPU cores; see ``plan_workers`` for ``workers``, ``gpus`` and ``workers_per_gpu``; with ``mps``, the
    GPU workers under CUDA's Multi-Process Service), printing one line per finished trial. With ``retry``, the
    failed trials no retry replaces are queued again first (``retry_failed``). With ``parallel_seeds``, each
    worker trains a trial's seeds side by side, one child process each on its device (``seeds.py``). Other
    machines may run workers on the same study at the same time."""
    out = out or sys.stdout
    storage_url = storage_url or DEFAULT_STORAGE
    study_name = check_study_name(study_name or spec.study, "--study")
    visible = _devices()
    workers, devices = plan_workers(visible, workers, gpus, workers_per_gpu)
    check_parallel_seeds(spec, parallel_seeds)
    if mps and not devices:
        raise ConfigError("--mps is invalid: no CUDA GPU is visible on this machine (MPS shares a GPU between the "
                          "worker processes)")
    if timeout is None:
        timeout = spec.budget.timeout
    elif not timeout > 0:
        raise ConfigError(f"--timeout={timeout!r} is invalid: must be seconds > 0")
    if n_trials is not None and not (isinstance(n_trials, int) and n_trials >= 1):
        raise ConfigError(f"--n-trials={n_trials!r} is invalid: must be an int >= 1")
    if n_trials is not None and spec.is_grid and n_trials > len(spec.grid):
        raise ConfigError(f"--n-trials={n_trials} is invalid: the grid of {spec.path} has {len(spec.grid)} valid "
                          "points")
    storage = open_storage(storage_url)
    _, line = prepare_study(spec, storage, study_name, n_trials)
    print(f"{line} in {describe(storage_url)}; runs in {spec.runs_dir}/{study_name}/", file=out, flush=True)
    if retry:
        with claim_lock(storage_url):  # two jobs here starting together queue each failed trial once
            again = retry_failed(storage, study_name)
        print(f"queued again: {len(again)} failed trial{'' if len(again) == 1 else 's'}"
              + (f" ({', '.join(map(str, again))})" if again else ""), file=out, flush=True)
    monitor = Monitor(spec, storage_url, study_name, out, bar=progress_bar)
    ran: list[int] = []
    errors: list[str] = []
    optuna = _optuna()
    open_states = (optuna.trial.TrialState.WAITING, optuna.trial.TrialState.RUNNING)
    if not storage.get_all_trials(monitor.study_id, deepcopy=False, states=open_states):
        monitor.close()
        print("nothing left to run", file=out, flush=True)
    else:
        side_by_side = len(spec.seeds) if parallel_seeds else 1  # processes training at once per worker
        threads = None if workers * side_by_side == 1 else max(1, _cpu_count() // (workers * side_by_side))
        if devices:
            where = ", ".join(f"worker {i} -> GPU {devices[i]}" for i in range(workers)) + (", MPS" if mps else "")
        elif spec.sets("run.threads"):
            where = "CPU, threads per worker from the spec's run.threads"
        else:
            where = f"CPU, {threads or 'all'} thread{'' if threads == 1 else 's'} per worker"
        print(f"{workers} worker{'s' if workers > 1 else ''} here ({where})", file=out, flush=True)
        if not isinstance(storage, optuna.storages.RDBStorage):
            print("note: this storage has no heartbeats: a trial whose worker dies stays RUNNING and is not retried",
                  file=out, flush=True)
        if workers == 1 and devices == visible and not mps:  # nothing to pin: trials run in this process
            monitor.start()
            try:
                ran = run_worker(spec, storage_url, study_name, timeout=timeout, threads=threads,
                                 parallel_seeds=parallel_seeds)
            finally:
                monitor.close()
        else:
            with mps_daemon(Path(spec.runs_dir) / study_name / "mps") if mps else contextlib.nullcontext({}) as env:
                errors = _run_local_workers(spec, storage_url, study_name, workers, devices, threads, timeout,
                                            monitor, env, parallel_seeds)
    counts, best, first_error = summarize(spec, storage, study_name)
    return SweepSummary(study_name, describe(storage_url), counts, best, ran, errors, first_error)


def _run_local_workers(spec: SweepSpec, storage_url: str, study_name: str, workers: int, devices: list[str],
                       threads: int | None, timeout: float | None, monitor: Monitor,
                       extra_env: dict[str, str] | None = None, parallel_seeds: bool = False) -> list[str]:
    """Start ``workers`` child processes (``momkit sweep ... --worker-index i``), each logging to
    ``<runs_dir>/<study>/workers/worker-<i>.log``; poll the monitor until they end. A worker that stops because
    a trial broke its GPU (exit status ``EXIT_DEVICE_LOST``) is replaced by a fresh process with the time left.
    Returns their errors."""
    log_dir = Path(spec.runs_dir) / study_name / "workers"
    log_dir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()

    def spawn(i: int, mode: str, left: float | None):
        log = open(log_dir / f"worker-{i}.log", mode)  # noqa: SIM115 (closed below)
        return subprocess.Popen(worker_command(spec.path, storage_url, study_name, i, threads, left, parallel_seeds),
                                env={**worker_env(i, devices, threads), **(extra_env or {})}, stdout=log,
                                stderr=subprocess.STDOUT), log

    procs = [spawn(i, "w", timeout) for i in range(workers)]
    logs = [log for _, log in procs]
    try:
        while True:
            monitor.poll()
            for i, (p, _) in enumerate(procs):
                left = None if timeout is None else timeout - (time.monotonic() - start)
                if p.poll() == EXIT_DEVICE_LOST and (left is None or left > 0):
                    print(f"worker {i} stopped: a trial left its GPU unusable ({log_dir}/worker-{i}.log); a fresh "
                          "worker takes its place", file=monitor.out, flush=True)
                    procs[i] = spawn(i, "a", left)
                    logs.append(procs[i][1])
            if all(p.poll() is not None for p, _ in procs):
                break
            time.sleep(monitor.interval)
    except KeyboardInterrupt:  # a terminal sends SIGINT to the children too; a parent killed alone passes it on
        for p, _ in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p, _ in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        raise
    finally:
        for log in logs:
            log.close()
        monitor.close()
    errors = []
    for i, (p, _) in enumerate(procs):
        if p.returncode != 0:
            tail = (log_dir / f"worker-{i}.log").read_text().strip().splitlines()[-3:]
            errors.append(f"worker {i} exited with status {p.returncode} ({log_dir}/worker-{i}.log): "
                          + " | ".join(tail))
    return errors


def format_summary(spec: SweepSpec, s: SweepSummary) -> str:
    counts = ", ".join(f"{n} {k.lower()}" for k, n in sorted(s.counts.items()))
    lines = [f"study {s.study!r} ({s.storage}): {counts or 'no trials'}"]
    if s.best is not None:
        names = short_names(list(spec.space))
        params = " ".join(f"{names.get(k, k)}={fmt_value(v)}" for k, v in s.best["params"].items())
        std = f" ± {s.best['std']:.4f}" if len(spec.seeds) > 1 else ""
        lines.append(f"best: trial {s.best['number']}  {spec.objective.metric}={s.best['value']:.4f}{std}  {params}")
    lines += s.worker_errors
    return "\n".join(lines)


__all__ = ["Monitor", "SweepSummary", "format_summary", "make_pruner", "make_sampler", "plan_workers",
           "prepare_study", "run_sweep", "run_worker", "summarize", "trial_line"]
