"""Run the kernel test suite on a GPU and write the report (device, versions, commit, pytest summary).

    python -m benchmarks.gpu_tests --out benchmarks/results/gpu_tests_<date>.txt [--workers 8] [--commit SHA]
        [--paths tests/kernels tests/models] [-- PYTEST_ARGS]

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
about one large reference plus the small tests of the other workers.
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


def margins(junit: str) -> list[str]:
    worst: dict[str, tuple[float, str]] = defaultdict(lambda: (float("-inf"), ""))
    for case in ET.parse(junit).getroot().iter("testcase"):
        for prop in case.iter("property"):
            m = re.match(r"C_needed\[(.*)\|(.*)\]", prop.get("name", ""))
            if m:
                value = float(prop.get("value"))
                key = f"{m.group(1)} ({m.group(2)})"
                if value > worst[key][0]:
                    worst[key] = (value, case.get("name"))
    return [f"  {k:<40} {v:7.2f}  {name}" for k, (v, name) in sorted(worst.items())]


def largest(junit: str, n: int = 8) -> list[str]:
    """The tests with the largest peak device memory and the longest times."""
    cases = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        peak = next((float(p.get("value")) for p in case.iter("property") if p.get("name") == "peak_cuda_mib"), 0.0)
        cases.append((peak, float(case.get("time", 0.0)), case.get("name")))
    out = ["", f"largest peak device memory (of {len(cases)} tests):"]
    out += [f"  {p / 1024:7.2f} GiB  {t:7.1f} s  {name}" for p, t, name in sorted(cases, reverse=True)[:n]]
    out += ["", "longest tests:"]
    out += [f"  {t:7.1f} s  {p / 1024:7.2f} GiB  {name}" for p, t, name in sorted(cases, key=lambda c: -c[1])[:n]]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--commit", default=None, help="commit to record (the device copy has no .git)")
    ap.add_argument("--timeout", type=int, default=540)
    ap.add_argument("--paths", nargs="+", default=["tests/kernels"], metavar="PATH",
                    help="test files or folders (default tests/kernels; tests/models holds the decoding tests)")
    ap.add_argument("pytest_args", nargs="*")
    args = ap.parse_args()
    env = environment(args.commit)
    junit = os.path.splitext(args.out)[0] + ".junit.xml"
    # pytest-benchmark (in the device image) warns once per worker that xdist disables it: not loaded
    cmd = [sys.executable, "-m", "pytest", *args.paths, "-m", "gpu", "-q", "-p", "no:cacheprovider",
           "-p", "no:benchmark", f"-n{args.workers}", "--dist", "loadgroup", f"--junitxml={junit}", *args.pytest_args]
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=args.timeout)
        status = f"exit code {proc.returncode}"
    except subprocess.TimeoutExpired:
        # an interrupted pytest still prints its summary (the failures so far) and writes the JUnit file
        proc.send_signal(signal.SIGINT)
        try:
            output, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        status = f"TIMED OUT after {args.timeout} s (interrupted: the tests not yet run are not in the summary)"
    lines = [
        "momkit kernel tests on GPU",
        f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        *(f"{k}: {v}" for k, v in env.items()),
        f"command: {' '.join(cmd[1:])}",
        f"status: {status}, {time.time() - t0:.0f} s",
        "",
        "pytest output (summary):",
        output[-20000:],
    ]
    if os.path.exists(junit):
        try:
            lines += ["", "largest recorded precision margin C_needed per tensor (limit: 8 half, 16 fp32):",
                      *margins(junit), *largest(junit)]
        except ET.ParseError as e:
            lines.append(f"(junit file unreadable: {e})")
    text = "\n".join(lines) + "\n"
    with open(args.out, "w") as f:
        f.write(text)
    print(text[-6000:])


if __name__ == "__main__":
    main()
