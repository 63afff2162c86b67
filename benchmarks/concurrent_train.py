"""How many small training processes one GPU sustains: the throughput a sweep gets from ``--workers-per-gpu``.

    python -m benchmarks.concurrent_train --out benchmarks/results/concurrent_train_<device>.json [--commit SHA]
        [--workers 1,4,12] [--seconds 20] [--config mqar_capacity] [--batch 256] [--seq-len 128]
        [--set model.mixer=mom ...] [--mps]

A small model (by default the capacity protocol's, ``momkit/configs/mqar_capacity.yaml``) issues many short
kernels, so one process leaves most of the GPU idle. For each count N in ``--workers`` this starts N processes,
each training its own copy of the model as ``benchmarks.gpu_train`` does (AdamW, bf16 autocast, random token ids);
after every process has warmed up (compilation, first steps), all of them train for ``--seconds`` and count their
steps. Reported per N: the steps per second of all processes together, each process's milliseconds per step, and
the speed-up over one process. With ``--mps`` the same counts run again under CUDA's Multi-Process Service (the
daemon that ``momkit sweep --mps`` starts, here with its folders in a temporary folder), which lets the
processes' kernels run on the GPU at the same time instead of taking turns.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path

from benchmarks._common import environment
from momkit.config import ConfigError
from momkit.sweep.workers import mps_daemon


def _worker(config: str, sets: tuple[str, ...], batch: int, seq_len: int, warmup: int, threads: int,
            ready, start, seconds: float, results) -> None:
    import torch

    from benchmarks.gpu_train import build_ours, train_steps

    torch.set_num_threads(threads)
    device = torch.device("cuda")
    try:
        model = build_ours(device, config, sets)
        step = train_steps(model, batch, seq_len, model.cfg.vocab_size, device)
        for _ in range(warmup):
            step()
        torch.cuda.synchronize()
    except Exception as e:  # report, don't hang the others
        results.put({"error": f"{type(e).__name__}: {e}"[:300]})
        ready.wait()
        return
    ready.wait()
    start.wait()
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        steps += 1
    torch.cuda.synchronize()
    results.put({"steps": steps, "seconds": time.perf_counter() - t0})


def run_count(n: int, args, threads: int) -> dict:
    ctx = mp.get_context("spawn")
    ready, start, results = ctx.Barrier(n + 1), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(args.config, tuple(args.set), args.batch, args.seq_len, args.warmup,
                                               threads, ready, start, args.seconds, results)) for _ in range(n)]
    for p in procs:
        p.start()
    ready.wait()
    start.set()
    rows = [results.get() for _ in range(n)]
    for p in procs:
        p.join()
    errors = [r["error"] for r in rows if "error" in r]
    if errors:
        return {"workers": n, "error": errors[0]}
    steps_per_s = sum(r["steps"] / r["seconds"] for r in rows)
    ms = [1e3 * r["seconds"] / r["steps"] for r in rows]
    return {"workers": n, "steps_per_s": steps_per_s, "ms_per_step_mean": sum(ms) / n, "ms_per_step_max": max(ms),
            "tokens_per_s": steps_per_s * args.batch * args.seq_len}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--commit", default=None)
    ap.add_argument("--workers", default="1,4,12", help="comma-separated process counts")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--config", default="mqar_capacity")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--mps", action="store_true", help="also run every count under CUDA MPS")
    args = ap.parse_args(argv)
    try:
        args.counts = [int(n) for n in args.workers.split(",")]
    except ValueError:
        ap.error(f"--workers {args.workers!r}: comma-separated positive ints expected, e.g. 1,4,12")
    if not args.counts or min(args.counts) < 1:
        ap.error(f"--workers {args.workers!r}: comma-separated positive ints expected, e.g. 1,4,12")
    for key in ("seconds", "warmup", "batch", "seq_len"):
        if getattr(args, key) <= 0:
            ap.error(f"--{key.replace('_', '-')} {getattr(args, key)}: must be > 0")
    from momkit.config import ConfigError, load_config

    try:
        load_config(args.config, list(args.set))
    except ConfigError as e:
        ap.error(f"--config {args.config} with --set {args.set}: {e}")
    return args


def main() -> None:
    args = parse_args()
    cores = len(os.sched_getaffinity(0))
    result = {"environment": environment(args.commit), "config": args.config, "set": args.set,
              "batch": args.batch, "seq_len": args.seq_len, "seconds": args.seconds, "runs": []}
    for mode in ["plain", "mps"] if args.mps else ["plain"]:
        with tempfile.TemporaryDirectory(prefix="mps") as folder, contextlib.ExitStack() as stack:
            try:
                env = stack.enter_context(mps_daemon(Path(folder))) if mode == "mps" else {}
            except ConfigError as e:
                result["runs"].append({"mode": mode, "error": str(e)[:300]})
                print(mode, "unavailable:", e, flush=True)
                continue
            os.environ.update(env)  # the spawned workers inherit it
            try:
                for n in args.counts:
                    row = {"mode": mode, **run_count(n, args, max(1, cores // n))}
                    result["runs"].append(row)
                    print(json.dumps(row), flush=True)
                    with open(args.out, "w") as f:
                        json.dump(result, f, indent=1)
            finally:
                for key in env:
                    os.environ.pop(key, None)
    one = {r["mode"]: r["steps_per_s"] for r in result["runs"] if r.get("workers") == 1 and "steps_per_s" in r}
    base = one.get("plain")
    print(f"{'mode':6} {'N':>3} {'steps/s':>9} {'ms/step':>8} {'x one':>6}")
    for r in result["runs"]:
        if "steps_per_s" in r:
            gain = r["steps_per_s"] / base if base else float("nan")
            print(f"{r['mode']:6} {r['workers']:3d} {r['steps_per_s']:9.1f} {r['ms_per_step_mean']:8.1f} {gain:6.2f}")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
