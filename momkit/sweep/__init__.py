"""Optuna sweeps over memory count, top-k, shared memory, rule and router, on one machine or many.

    from momkit.sweep import load_spec, run_sweep, write_report

    spec = load_spec("sweeps/demo.yaml")               # validated: one ConfigError naming the bad key
    summary = run_sweep(spec, "sqlite:///runs/sweeps.db", workers=2)
    write_report("demo", "sqlite:///runs/sweeps.db")   # CSV, Parquet, figures, best config

``spec`` (the YAML format and its validation), ``storage`` (URL -> Optuna storage), ``runner`` (the study's
queue of trials, workers, heartbeats and retries), ``progress`` (a line per finished trial, the progress bar),
``report`` (export and figures). Optuna, pandas
and seaborn are imported here, never by ``import momkit``. See docs/sweeps.md.
"""

from momkit.sweep.report import Report, trials_frame, write_report
from momkit.sweep.runner import SweepSummary, format_summary, prepare_study, run_sweep, run_worker
from momkit.sweep.spec import Param, SweepSpec, load_spec
from momkit.sweep.storage import DEFAULT_STORAGE, open_storage

__all__ = ["DEFAULT_STORAGE", "Param", "Report", "SweepSpec", "SweepSummary", "format_summary", "load_spec",
           "open_storage", "prepare_study", "run_sweep", "run_worker", "trials_frame", "write_report"]
