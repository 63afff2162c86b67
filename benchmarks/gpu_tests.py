"""Run the kernel test suite on a GPU and write the report (device, versions, commit, pytest summary).

    python -m benchmarks.gpu_tests --out benchmarks/results/gpu_tests_<date>.txt [--workers 8] [--commit SHA]
        [--paths tests/kernels tests/models] [--apart "titans or ttt" [--apart-workers 6]] [-- PYTEST_ARGS]

Runs ``pytest tests/kernels -m gpu`` (the GPU-marked kernel tests: every interpreter test again on CUDA,
plus the odd sizes and the 65,536-token sequences; ``--paths`` names others, e.g. tests/models for the
decoding tests) in parallel workers, with a JUnit file from which
it adds, per tensor kind, the largest precision margin the tests recorded: ``C_needed`` is
``(max |kernel - ref64| - 2 max |ref_lowprec - ref64|) / (u max |ref64|)``, which the tests require
to be at most C (8 for float16 / bfloat16, 16 for float32); and the tests with the largest peak
device memory and the longest run times.

The workers share one GPU: ``--dist loadgroup`` runs the tests of the xdist group
``large_reference`` (float64 references of several GiB) on one worker, one after the other, and each
test hands its cached memory back when it ends (tests/kernels/conftest.py), so the suite's peak is
about one large reference plus the small tests of the other workers. ``--apart EXPR`` runs the tests that
``-k EXPR`` selects after the others, with fewer workers: titans' and ttt's float32 kernels spill, and each
process that ran one keeps GiBs of local memory; on an 80 GiB H100, twelve workers running them beside the
rest ran out of device memory (188 tests of every rule failed), where the same suite passes on the 139 GiB
H200.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import defaultdict

from benchmarks._common import environment


def _cases(junits: list[str]):
    for junit in junits:
        yield from ET.parse(junit).getroot().iter("testcase")


def margins(junits: list[str]) -> list[str]:
    worst: dict[str, tuple[float, str]] = defaultdict(lambda: (float("-inf"), ""))
    for case in _cases(junits):
        for prop in case.iter("property"):
            m = re.match(r"C_needed\[(.*)\|(.*)\]", prop.get("name", ""))
            if m:
                value = float(prop.get("value"))
                key = f"{m.group(1)} ({m.group(2)})"
                if value > worst[key][0]:
                    worst[key] = (value, case.get("name"))
    return [f"  {k:<40} {v:7.2f}  {name}" for k, (v, name) in sorted(worst.items())]


def largest(junits: list[str], n: int = 8) -> list[str]:
    """The tests with the largest peak device memory and the longest times."""
    cases = []
    for case in _cases(junits):
        peak = next((float(p.get("value")) for p in case.iter("property") if p.get("name") == "peak_cuda_mib"), 0.0)
        # a crashed worker's entry may have no name: the report names it by its class, or "?"
        cases.append((peak, float(case.get("time", 0.0)), case.get("name") or case.get("classname") or "?"))
    out = ["", f"largest peak device memory (of {len(cases)} tests):"]
    out += [f"  {p / 1024:7.2f} GiB  {t:7.1f} s  {name}" for p, t, name in sorted(cases, key=lambda c: -c[0])[:n]]
    out += ["", "longest tests:"]
    out += [f"  {t:7.1f} s  {p / 1024:7.2f} GiB  {name}" for p, t, name in sorted(cases, key=lambda c: -c[1])[:n]]
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--commit", default=None, help="commit to record (the device copy has no .git)")
    ap.add_argument("--timeout", type=int, default=540, help="seconds for the whole run, every phase included")
    ap.add_argument("--paths", nargs="+", default=["tests/kernels"], metavar="PATH",
                    help="test files or folders (default tests/kernels; tests/models holds the decoding tests)")
    ap.add_argument("--apart", default=None, metavar="EXPR",
                    help="run the tests this -k expression selects after the others, with --apart-workers "
                         "(e.g. 'titans or ttt' on an 80 GiB card)")
    ap.add_argument("--apart-workers", type=int, default=None, metavar="N", help="default: half of --workers")
    ap.add_argument("pytest_args", nargs="*")
    args = ap.parse_args(argv)
    for name in ("workers", "apart_workers"):
        value = getattr(args, name)
        if value is not None and value < 1:
            ap.error(f"--{name.replace('_', '-')} {value} is invalid: give a positive number of workers")
    if args.apart is not None and any(a == "-k" or a.startswith("-k") for a in args.pytest_args):
        ap.error(f"--apart {args.apart!r} cannot be combined with a -k of the pytest arguments "
                 f"({' '.join(args.pytest_args)}): --apart selects by -k itself; fold the two into one --apart "
                 "or drop it")
    return args


def phases(args: argparse.Namespace) -> list[tuple[list[str], str]]:
    """The pytest commands to run one after the other, each with its JUnit file."""
    base = os.path.splitext(args.out)[0]
    # pytest-benchmark (in the device image) warns once per worker that xdist disables it: not loaded
    head = [sys.executable, "-m", "pytest", *args.paths, "-m", "gpu", "-q", "-p", "no:cacheprovider",
            "-p", "no:benchmark", "--dist", "loadgroup"]
    if args.apart is None:
        runs = [(args.workers, [], "")]
    else:
        runs = [(args.workers, ["-k", f"not ({args.apart})"], ".rest"),
                (args.apart_workers or max(1, args.workers // 2), ["-k", args.apart], ".apart")]
    return [([*head, f"-n{n}", f"--junitxml={base}{tag}.junit.xml", *k, *args.pytest_args], f"{base}{tag}.junit.xml")
            for n, k, tag in runs]


def run(cmd: list[str], timeout: float) -> tuple[str, str]:
    """pytest's output and how it ended; one cut by ``timeout`` is interrupted as Ctrl-C would, so that it still
    prints its summary (the failures so far) and writes its JUnit file."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=max(timeout, 1))
        return output, f"exit code {proc.returncode}"
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        try:
            output, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        return output, "TIMED OUT (interrupted: the tests not yet run are not in the summary)"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    env = environment(args.commit)
    t0 = time.time()
    lines = ["momkit kernel tests on GPU", f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
             *(f"{k}: {v}" for k, v in env.items())]
    runs = phases(args)
    outputs, junits = [], []
    for cmd, junit in runs:
        start = time.time()
        if args.timeout - (start - t0) < 5:
            lines += [f"command: {' '.join(cmd[1:])}", "status: not run (the time limit was spent)"]
            continue
        output, status = run(cmd, args.timeout - (start - t0))
        lines += [f"command: {' '.join(cmd[1:])}", f"status: {status}, {time.time() - start:.0f} s"]
        outputs.append(output)
        if os.path.exists(junit):
            junits.append(junit)
    lines += ["", "pytest output (summary):"]
    for output in outputs:
        lines.append(output[-20000 // len(outputs):])
    if junits:
        try:
            lines += ["", "largest recorded precision margin C_needed per tensor (limit: 8 half, 16 fp32):",
                      *margins(junits), *largest(junits)]
        except ET.ParseError as e:
            lines.append(f"(junit file unreadable: {e})")
    text = "\n".join(lines) + "\n"
    with open(args.out, "w") as f:
        f.write(text)
    print(text[-6000:])


if __name__ == "__main__":
    main()
