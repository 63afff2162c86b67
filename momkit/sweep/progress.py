"""Progress of a sweep: one line per finished trial, of every worker on every machine, under an overall progress
bar (``Monitor``), and the short parameter names those lines and the report use."""

from __future__ import annotations

import contextlib
import sys
import threading
from typing import Any, TextIO

from momkit.sweep.spec import SweepSpec
from momkit.sweep.storage import open_storage, retried_as


def short_names(names: list[str]) -> dict[str, str]:
    """The shortest dotted suffix of each name that is unique among ``names``."""
    out = {}
    for name in names:
        parts = name.split(".")
        for i in range(len(parts) - 1, -1, -1):
            short = ".".join(parts[i:])
            if sum(n == short or n.endswith("." + short) for n in names) == 1:
                out[name] = short
                break
        else:
            out[name] = name
    return out


def fmt_value(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def trial_line(spec: SweepSpec, t, trials_by_retry: dict[int, int]) -> str:
    """One line for a finished trial."""
    metric = spec.objective.metric
    names = short_names(list(spec.space))
    params = " ".join(f"{names[k]}={fmt_value(v)}" for k, v in t.params.items() if k in names)
    ua = t.user_attrs
    state = t.state.name
    if ua.get("skipped"):
        state, what = "SKIPPED", ua["skipped"]
    elif state == "COMPLETE":
        std = ua.get("objective_std", 0.0)
        what = f"{metric}={t.value:.4f}" + (f"±{std:.4f}" if len(spec.seeds) > 1 else "")
    elif state == "PRUNED":
        what = ua.get("pruned", "pruned")
    else:
        what = (ua.get("error") or "").split("\n")[0]  # a CUDA error's advice lines stay in the attribute
        what = what or f"worker died (no heartbeat for {spec.heartbeat.grace_period} s)"
        if t.number in trials_by_retry:
            what += f"; retried as trial {trials_by_retry[t.number]}"
    tail = ""
    steps = ua.get("steps") or []
    if state == "COMPLETE" and steps:
        tail += f"  {max(steps)} steps"
    if t.datetime_start and t.datetime_complete:
        tail += f"  {(t.datetime_complete - t.datetime_start).total_seconds():.0f} s"
    if state == "COMPLETE":
        return f"trial {t.number:>3}  {state:<8}  {what}  {params}{tail}"
    return f"trial {t.number:>3}  {state:<8}  {params}  {what}{tail}"


class Monitor:
    """Polls the study and prints one line per finished trial (every worker's, on every machine) under an
    overall progress bar (shown on a terminal)."""

    def __init__(self, spec: SweepSpec, storage_url: str, study_name: str, out: TextIO, interval: float = 1.0,
                 bar: bool | None = None):
        self.spec, self.url, self.study_name, self.out, self.interval = spec, storage_url, study_name, out, interval
        self.storage = open_storage(storage_url)
        self.study_id = self.storage.get_study_id_from_name(study_name)
        # trials finished before this command (a resumed study) are counted, not printed again
        self.seen: set[int] = {t.number for t in self.storage.get_all_trials(self.study_id, deepcopy=False)
                               if t.state.is_finished()}
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.show_bar = sys.stderr.isatty() if bar is None else bar
        self.bar = None  # drawn at the first poll, under the lines printed before

    def poll(self) -> None:
        trials = self.storage.get_all_trials(self.study_id, deepcopy=False)
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=len(trials), initial=len(self.seen), desc=self.study_name, unit="trial",
                            disable=not self.show_bar, dynamic_ncols=True, file=sys.stderr)
        by_retry = retried_as(trials)
        finished = [t for t in trials if t.state.is_finished()]
        new = [t for t in finished if t.number not in self.seen]
        for t in sorted(new, key=lambda t: t.datetime_complete or t.datetime_start or 0):
            self.seen.add(t.number)
            line = f"[{len(self.seen):>3}/{len(trials)}] " + trial_line(self.spec, t, by_retry)
            self.bar.write(line, file=self.out)
        self.bar.total = len(trials)
        self.bar.n = len(finished)
        self.bar.refresh()

    def _loop(self):
        while not self.stop.wait(self.interval):
            with contextlib.suppress(Exception):  # a locked or busy database: try again at the next tick
                self.poll()

    def start(self) -> Monitor:
        self.thread = threading.Thread(target=self._loop, daemon=True, name="sweep-monitor")
        self.thread.start()
        return self

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
        self.poll()
        if self.bar is not None:
            self.bar.close()


__all__ = ["Monitor", "trial_line"]
