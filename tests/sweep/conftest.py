"""Sweep test helpers: tiny specs (a few training steps per trial), the momkit command as a subprocess, and a
real PostgreSQL server on localhost (initdb into a temporary folder, pg_ctl start on a free port)."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

# a 2-layer MoM of hidden size 32 on a 16-token MQAR: a trial of 8 steps takes about a second on a CPU
TINY = {
    "model.vocab_size": 32, "model.hidden_size": 32, "model.mom.num_heads": 2, "model.mom.chunk_size": 16,
    "model.mom.topk": 1,
    "task.vocab_size": 32, "task.train": [{"num_examples": 256, "seq_len": 16, "num_kv_pairs": 2}],
    "task.valid": [{"num_examples": 64, "seq_len": 16, "num_kv_pairs": 2}],
    "optim.batch_size": 32, "optim.max_steps": 8, "optim.warmup_steps": 2,
    "run.eval_every": 4, "run.log_every": 4, "run.checkpoint_every": 8, "run.device": "cpu", "run.threads": 1,
}


def write_spec(path: Path, drop: tuple[str, ...] = (), **sections) -> Path:
    """A sweep spec of tiny trials at ``path``; ``sections`` replace or add top-level keys (``overrides`` are
    merged into TINY, less the keys in ``drop``)."""
    tiny = {k: v for k, v in TINY.items() if k not in drop}
    spec = {
        "base": "mqar_tiny",
        "overrides": {**tiny, **sections.pop("overrides", {})},
        "space": {"model.mom.num_memories": [1, 2]},
        "objective": {"metric": "valid/accuracy", "direction": "maximize"},
        "sampler": {"name": "grid"},
        "runs_dir": str(path.parent / "runs"),
        "heartbeat": {"interval": 1, "grace_period": 2, "max_retry": 1},
    }
    spec.update(sections)
    spec = {k: v for k, v in spec.items() if v is not None}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def momkit(*args, cwd: Path, check: bool = True, timeout: float = 240) -> subprocess.CompletedProcess:
    """``python -m momkit ARGS`` in ``cwd``."""
    out = subprocess.run([sys.executable, "-m", "momkit", *map(str, args)], cwd=cwd, capture_output=True,
                         text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"momkit {' '.join(map(str, args))} exited {out.returncode}:\n{out.stdout}\n{out.stderr}")
    return out


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """In-process trials set run.threads=1 (torch.set_num_threads); give the test process its threads back."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def make_spec():
    """``make_spec(path, **sections)``: write a spec of tiny trials (see ``write_spec``)."""
    return write_spec


@pytest.fixture
def momkit_cmd():
    """``momkit_cmd(*args, cwd=...)``: run ``python -m momkit`` (see ``momkit``)."""
    return momkit


@pytest.fixture
def list_files():
    return files_under


# ---------------------------------------------------------------------------------------- PostgreSQL
def _pg_bindir() -> Path | None:
    candidates = []
    if shutil.which("pg_config"):
        try:
            out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True)
            candidates.append(Path(out.stdout.strip()))
        except subprocess.CalledProcessError:
            pass
    candidates += [Path(p).parent for p in sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), reverse=True)]
    if shutil.which("pg_ctl"):
        candidates.append(Path(shutil.which("pg_ctl")).parent)
    for d in candidates:
        if (d / "initdb").is_file() and (d / "pg_ctl").is_file():
            return d
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_user() -> str | None:
    """PostgreSQL refuses to run as root: run it as 'postgres' (Debian's package creates it) or 'nobody'."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    pytest.fail("running as root with neither a 'postgres' nor a 'nobody' user to run PostgreSQL as")


@pytest.fixture(scope="module")
def postgres_url():
    """A PostgreSQL server of our own on 127.0.0.1 (stopped and deleted afterwards); its SQLAlchemy URL."""
    bindir = _pg_bindir()
    if bindir is None:
        reason = ("PostgreSQL server binaries (initdb, pg_ctl) are not installed; `.ci/run` installs Debian's "
                  "postgresql package (apt-get install -y postgresql)")
        if os.environ.get("MOMKIT_REQUIRE_POSTGRES"):
            pytest.fail(reason)
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="momkit-pg-"))
    user = _server_user()
    prefix = ["runuser", "-u", user, "--"] if user else []
    if user:
        info = pwd.getpwnam(user)
        os.chown(root, info.pw_uid, info.pw_gid)
    port = _free_port()
    data, log = root / "data", root / "server.log"
    subprocess.run([*prefix, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                    "--no-sync"], check=True, capture_output=True, cwd=root)
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50"
    start = subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(log), "-w",
                            "-t", "60", "start"], capture_output=True, text=True, cwd=root)
    if start.returncode != 0:
        text = log.read_text() if log.exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"pg_ctl start failed: {start.stdout} {start.stderr} {text}")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"  # the plain form, as docs/sweeps.md writes it
    finally:
        subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, cwd=root)
        time.sleep(0.2)
        shutil.rmtree(root, ignore_errors=True)
