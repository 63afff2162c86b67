"""Where a sweep's local worker processes run: which GPU each is pinned to (``--gpus``, ``--workers-per-gpu``),
their share of the CPU cores, CUDA's Multi-Process Service for several workers on one GPU (``--mps``), and the
command that starts one."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from momkit.config import ConfigError


def _devices() -> list[str]:
    """GPU ids a worker can be pinned to (honouring CUDA_VISIBLE_DEVICES), or [] on a CPU machine."""
    import torch

    if not torch.cuda.is_available():
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return [d.strip() for d in visible.split(",") if d.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def plan_workers(visible: list[str], workers: int | None = None, gpus: str | None = None,
                 workers_per_gpu: int | None = None) -> tuple[int, list[str]]:
    """How many local workers to start and the GPU of each (``CUDA_VISIBLE_DEVICES`` of worker i), from the GPUs
    ``visible`` here and the ``--workers``, ``--gpus`` and ``--workers-per-gpu`` options.

    With GPUs: the named ``gpus`` (ids as in ``CUDA_VISIBLE_DEVICES`` / nvidia-smi; default: every visible one),
    workers assigned round robin over them; ``workers`` defaults to ``workers_per_gpu`` (default 1) per GPU
    and may not exceed that when ``workers_per_gpu`` is given. Without GPUs: ``workers`` (default 1) CPU
    workers, and the GPU options are errors."""
    if workers is not None and not (isinstance(workers, int) and workers >= 1):
        raise ConfigError(f"--workers={workers!r} is invalid: must be an int >= 1")
    if workers_per_gpu is not None and not (isinstance(workers_per_gpu, int) and workers_per_gpu >= 1):
        raise ConfigError(f"--workers-per-gpu={workers_per_gpu!r} is invalid: must be an int >= 1")
    if gpus is not None:
        chosen = [g.strip() for g in str(gpus).split(",")]
        if not visible:
            raise ConfigError(f"--gpus={gpus!r} is invalid: no CUDA GPU is visible on this machine")
        if "" in chosen:
            raise ConfigError(f"--gpus={gpus!r} is invalid: a comma-separated list of GPU ids is expected, "
                              f"e.g. {','.join(visible[:2])}")
        unknown = [g for g in chosen if g not in visible]
        if unknown:
            raise ConfigError(f"--gpus={gpus!r} is invalid: GPU {', '.join(unknown)} is not visible here (visible: "
                              f"{', '.join(visible)}; ids as in CUDA_VISIBLE_DEVICES or nvidia-smi)")
        if len(set(chosen)) < len(chosen):
            raise ConfigError(f"--gpus={gpus!r} is invalid: a GPU is named twice (for several workers on one GPU "
                              "use --workers-per-gpu)")
    elif not visible:
        if workers_per_gpu is not None:
            raise ConfigError(f"--workers-per-gpu={workers_per_gpu} is invalid: no CUDA GPU is visible on this "
                              "machine (CPU workers share the cores: use --workers)")
        return workers or 1, []
    else:
        chosen = list(visible)
    per_gpu = workers_per_gpu or 1
    slots = len(chosen) * per_gpu
    if workers is not None and workers_per_gpu is not None and workers > slots:
        raise ConfigError(f"--workers={workers} is invalid: {len(chosen)} GPU{'s' if len(chosen) > 1 else ''} "
                          f"({', '.join(chosen)}) with --workers-per-gpu={per_gpu} take at most {slots} workers; "
                          f"raise --workers-per-gpu to {-(-workers // len(chosen))} or name more --gpus")
    n = workers or slots
    return n, [chosen[i % len(chosen)] for i in range(n)]


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def worker_env(index: int, devices: list[str], threads: int | None) -> dict[str, str]:
    """The environment of local worker ``index``: its GPU (``devices[index]``, round robin when shorter; see
    ``plan_workers``) and its share of the cores (``threads``; where several workers share the machine)."""
    env = dict(os.environ)
    if devices:
        env["CUDA_VISIBLE_DEVICES"] = devices[index % len(devices)]
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


MPS_CONTROL = "nvidia-cuda-mps-control"


@contextlib.contextmanager
def mps_daemon(folder: Path):
    """CUDA's Multi-Process Service for the worker processes started inside the block: its control daemon, with
    its pipe and log folders under ``folder``, started here and told to quit when the block ends; yields the
    environment entries that point a process at it. Without MPS, processes on one GPU take turns; with it, their
    kernels run side by side, which is what a small model's many short kernels need."""
    exe = shutil.which(MPS_CONTROL)
    if exe is None:
        raise ConfigError(f"--mps is invalid here: {MPS_CONTROL} (CUDA's Multi-Process Service, part of the NVIDIA "
                          "driver) is not on the PATH")
    env = {"CUDA_MPS_PIPE_DIRECTORY": str(folder / "pipe"), "CUDA_MPS_LOG_DIRECTORY": str(folder / "log")}
    for d in env.values():
        Path(d).mkdir(parents=True, exist_ok=True)
    said = Path(env["CUDA_MPS_LOG_DIRECTORY"]) / "start.out"
    with said.open("w") as out:  # a file, not a pipe: the daemon it forks may keep its output open
        started = subprocess.run([exe, "-d"], env={**os.environ, **env}, stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=subprocess.STDOUT)
    if started.returncode != 0:
        raise ConfigError(f"--mps: {MPS_CONTROL} -d failed with status {started.returncode}: "
                          f"{said.read_text().strip()[:300]}")
    try:
        yield env
    finally:
        subprocess.run([exe], input="quit\n", env={**os.environ, **env}, capture_output=True, text=True,
                       check=False)


def worker_command(spec_path: str, storage_url: str, study_name: str, index: int, threads: int | None,
                   timeout: float | None, parallel_seeds: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "momkit", "sweep", spec_path, "--storage", storage_url, "--study", study_name,
           "--worker-index", str(index)]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    if timeout is not None:
        cmd += ["--timeout", str(timeout)]
    if parallel_seeds:
        cmd += ["--parallel-seeds"]
    return cmd
