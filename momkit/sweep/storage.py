"""Where studies live: a storage URL -> an Optuna storage, with one clear error for a bad URL.

* ``sqlite:///runs/sweeps.db`` (the default): one file, no set-up; several worker processes on one machine.
* any SQLAlchemy URL, e.g. ``postgresql://user:password@host:5432/db``: many workers on many machines,
  every worker running the same ``momkit sweep`` command against the same URL.
* ``journal:PATH``: Optuna's JournalStorage on a file (a shared file system without a database server).

SQL storages get heartbeats (``RDBStorage(heartbeat_interval, grace_period)``) and Optuna's retry callback:
a running trial whose worker stopped beating is failed by another worker and queued again with the same
parameters. The journal has no heartbeat in Optuna, so there a dead worker's trial stays RUNNING.
"""

from __future__ import annotations

import contextlib
import random
import time
import warnings
from pathlib import Path
from typing import Any

from momkit.config import ConfigError

DEFAULT_STORAGE = "sqlite:///runs/sweeps.db"
JOURNAL_PREFIX = "journal:"


def describe(url: str) -> str:
    """The URL as it may be printed: without its password."""
    if url.startswith(JOURNAL_PREFIX):
        return url
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def _bad(url: str, why: str) -> ConfigError:
    return ConfigError(f"--storage={describe(url)!r} is invalid: {why} (use a SQLAlchemy URL such as "
                       f"{DEFAULT_STORAGE} or postgresql://user@host/db, or journal:PATH)")


def check_url(url: str) -> tuple[str, Path | None]:
    """Parse ``url`` without touching anything: (kind, file) with kind "sql" or "journal" and the local
    file for SQLite and journal storages (None for a database server)."""
    if not isinstance(url, str) or not url:
        raise _bad(str(url), "empty")
    if url.startswith(JOURNAL_PREFIX):
        path = url[len(JOURNAL_PREFIX):]
        if not path:
            raise _bad(url, "journal: needs a file path, e.g. journal:runs/sweeps.journal")
        return "journal", Path(path)
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise _bad(url, "not a URL") from None
    try:
        parsed.get_dialect()
    except NoSuchModuleError:
        raise _bad(url, f"unknown database dialect {parsed.drivername!r}") from None
    except ImportError as e:
        raise _bad(url, f"its database driver is not installed ({e}; pip install 'momkit[sweeps]' installs the "
                        "PostgreSQL drivers psycopg and psycopg2)") from None
    if parsed.get_backend_name() == "sqlite":
        if parsed.database in (None, "", ":memory:") or "mode=memory" in str(parsed.query):
            raise _bad(url, "an in-memory SQLite database cannot be shared by workers or resumed; name a file")
        return "sql", Path(parsed.database)
    return "sql", None


def _check_journal(path: Path) -> None:
    """A journal file that exists must start with a journal entry. (Optuna takes a single malformed line for a
    write in progress and appends after it, which would leave the file unreadable.)"""
    import json

    if not path.is_file() or path.stat().st_size == 0:
        return
    with path.open("rb") as f:
        first = f.readline()
    try:
        entry = json.loads(first)
    except ValueError:
        entry = None
    if not (isinstance(entry, dict) and "op_code" in entry):
        raise ValueError(f"its first line is not a journal entry: {first[:40]!r}")


def _engine_kwargs(url: str) -> dict[str, Any]:
    from sqlalchemy.engine import make_url

    if make_url(url).get_backend_name() == "sqlite":
        # several worker processes write one file: wait for a lock instead of failing after 5 s
        return {"connect_args": {"timeout": 60}}
    return {"pool_pre_ping": True}


@contextlib.contextmanager
def claim_lock(url: str):
    """Held while a worker claims a trial. A SQLite file's workers share one machine; Optuna's claim (read the
    trial's state, then write RUNNING) is not atomic there (pysqlite runs the read outside the write's
    transaction, and SQLite ignores SELECT ... FOR UPDATE), so two workers could both claim one trial: an
    exclusive lock on a file beside the database makes claims one at a time. Other storages claim atomically."""
    kind, path = check_url(url)
    if kind != "sql" or path is None:
        yield
        return
    import fcntl

    with open(f"{path}.claim-lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _use_wal(path: Path) -> None:
    """Write-ahead logging lets readers (the progress monitor, the report) run beside writers."""
    import sqlite3

    con = sqlite3.connect(str(path), timeout=60)
    try:
        con.execute("PRAGMA journal_mode=WAL")
    finally:
        con.close()


def open_storage(url: str, *, heartbeat=None, retry_callback=None, create: bool = True):
    """An Optuna storage for ``url``. ``heartbeat`` (a spec's Heartbeat) turns on heartbeats for SQL storages,
    with ``retry_callback`` called for every trial failed for lack of them. ``create=False`` refuses a SQLite
    or journal file that does not exist yet (for reading: nothing is created)."""
    import optuna
    from optuna.exceptions import ExperimentalWarning

    kind, path = check_url(url)
    if path is not None:
        if not create and not path.is_file():
            raise ConfigError(f"--storage={describe(url)!r}: {path} does not exist (no sweep has run there)")
        if path.is_dir():
            raise _bad(url, f"{path} is a directory; name a file")
        if create:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise _bad(url, f"its folder {path.parent} cannot be created ({e.strerror})") from None
    if kind == "journal":
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        try:
            _check_journal(path)
            return JournalStorage(JournalFileBackend(str(path)))
        except (OSError, ValueError) as e:  # unreadable, or not a journal (not UTF-8 text, not JSON lines)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise _bad(url, f"{path} cannot be read as an Optuna journal ({first})") from None
    if path is not None and create:
        try:
            _use_wal(path)
        except Exception as e:
            raise _bad(url, f"cannot open {path}: {e}") from None
    kwargs: dict[str, Any] = {"engine_kwargs": _engine_kwargs(url)}
    if heartbeat is not None:
        kwargs.update(heartbeat_interval=heartbeat.interval, grace_period=heartbeat.grace_period,
                      **{_stale_callback_arg(): retry_callback})
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for attempt in range(5):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                return optuna.storages.RDBStorage(url, **kwargs)
        except (IntegrityError, ProgrammingError):
            # workers that start together on a fresh database race to create Optuna's tables: the losers see
            # "duplicate key" / "already exists"; the tables are there a moment later
            if attempt == 4:
                raise
            time.sleep(0.2 + random.random())
        except Exception as e:  # connection refused, authentication, missing database, ...
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"--storage={describe(url)!r}: cannot open the storage: {first}") from None


def _stale_callback_arg() -> str:
    """Optuna >= 4.9 calls it heartbeat_stale_trial_callback; before, failed_trial_callback."""
    import inspect

    import optuna

    params = inspect.signature(optuna.storages.RDBStorage.__init__).parameters
    return "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in params else "failed_trial_callback"


def retry_callback(max_retry: int):
    """Optuna's callback that queues a heartbeat-stale trial again with the same parameters."""
    import optuna

    cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or optuna.storages.RetryFailedTrialCallback
    from optuna.exceptions import ExperimentalWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return cls(max_retry=max_retry)


def retried_as(trials) -> dict[int, int]:
    """Each trial that was queued again -> the newest retry that replaces it (a retry names the attempt it
    replaces, ``failed_trial``, and lists every attempt before it, ``retry_history``)."""
    out = {}
    for t in sorted(trials, key=lambda t: t.number):
        if "failed_trial" in t.system_attrs:
            out[t.system_attrs["failed_trial"]] = t.number
        for n in t.system_attrs.get("retry_history", []):
            out[n] = t.number
    return out


def heartbeat_enabled(storage) -> bool:
    get = getattr(storage, "get_heartbeat_interval", None)
    return callable(get) and get() is not None


def study_names(storage) -> list[str]:
    return sorted(s.study_name for s in storage.get_all_studies())
