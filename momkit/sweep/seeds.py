"""A trial's seeds trained side by side (``momkit sweep --parallel-seeds``): one child process per seed, on the
worker's device. A study with fewer trials left than the machine has room for (the capacity protocol's small
models, three seeds each) then fills it, and a trial takes the time of its slowest seed rather than the sum."""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Callable
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any


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
