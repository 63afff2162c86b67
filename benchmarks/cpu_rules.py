"""CPU benchmark: every rule's ``chunked`` path against its ``recurrent`` token loop.

    python -m benchmarks.cpu_rules [--out benchmarks/results/cpu_rules.json] [--repeats 7]
                                   [--allocator default|tuned]

B=2, T=1024, H=2, K=V=64, float32, forward and forward+backward. Timings are interleaved (each
repeat times the recurrent loop once and the chunked path five times), because a shared 2-core
machine drifts; the speed-up is the median of the per-repeat ratios.
Target (issue 2): chunked >= 20x faster than recurrent for every rule.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from benchmarks._common import environment
from momkit.rules import get_rule, rule_names
from momkit.runtime import cpu_allocator_tuned, tune_cpu_allocator
from momkit.testing import random_inputs


def _once(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_rule(name: str, B: int, T: int, H: int, K: int, V: int, repeats: int) -> dict:
    """Interleaved timing: each repeat times recurrent once and chunked ``inner`` times (their
    median), so both see the same machine state; the ratio is the median of per-repeat ratios."""
    rule = get_rule(name)
    q, k, v, gates = random_inputs(rule, B, T, H, K, V, torch.float32, seed=0)
    leaves = [q, k, v, *gates.values()]

    def run(impl: str, backward: bool):
        def fn():
            xs = [x.detach().requires_grad_(backward) for x in leaves]
            qq, kk, vv, *gg = xs
            o, S = rule.forward(qq, kk, vv, impl=impl, output_final_state=True, **dict(zip(gates, gg)))
            if backward:
                (o.square().sum() + S.square().sum()).backward()
        return fn

    row = {"rule": name}
    inner = 5
    for mode, backward in (("fwd", False), ("fwd_bwd", True)):
        rec, chk = run("recurrent", backward), run("chunked", backward)
        # warm-up: a process's first calls pay one-time costs (thread pool; glibc raises its mmap threshold
        # only after freeing large blocks, so until then every large allocation is a fresh mmap)
        rec()
        for _ in range(10):
            chk()
        t_rec, t_chk, ratios = [], [], []
        for _ in range(repeats):
            tr = _once(rec)
            tc = statistics.median(_once(chk) for _ in range(inner))
            t_rec.append(tr)
            t_chk.append(tc)
            ratios.append(tr / tc)
        row[f"{mode}_recurrent_ms"] = round(statistics.median(t_rec) * 1e3, 2)
        row[f"{mode}_chunked_ms"] = round(statistics.median(t_chk) * 1e3, 2)
        row[f"{mode}_speedup"] = round(statistics.median(ratios), 1)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rules", nargs="*", default=None, help="subset of rules (default: all)")
    ap.add_argument("--allocator", choices=["default", "tuned"], default="default",
                    help="'tuned': raise glibc's trim/mmap thresholds first (momkit.runtime.tune_cpu_allocator)")
    args = ap.parse_args()
    if args.allocator == "tuned" and not tune_cpu_allocator():
        raise SystemExit("--allocator tuned: could not tune this C library's allocator (not glibc?)")
    shape = dict(B=2, T=1024, H=2, K=64, V=64)
    rows = [bench_rule(n, **shape, repeats=args.repeats) for n in (args.rules or rule_names())]
    print(f"{'rule':<16}{'fwd rec ms':>11}{'fwd chk ms':>11}{'x':>7}{'f+b rec ms':>12}{'f+b chk ms':>12}{'x':>7}")
    for r in rows:
        print(f"{r['rule']:<16}{r['fwd_recurrent_ms']:>11}{r['fwd_chunked_ms']:>11}{r['fwd_speedup']:>7}"
              f"{r['fwd_bwd_recurrent_ms']:>12}{r['fwd_bwd_chunked_ms']:>12}{r['fwd_bwd_speedup']:>7}")
    worst = min(min(r["fwd_speedup"], r["fwd_bwd_speedup"]) for r in rows)
    print(f"smallest speed-up: {worst}x (target >= 20x)")
    if args.out:
        result = {"benchmark": "cpu_rules", "shape": shape, "dtype": "float32", "repeats": args.repeats,
                  "allocator_tuned": cpu_allocator_tuned(),
                  "target": "chunked >= 20x faster than recurrent", "met": worst >= 20,
                  **environment(), "rows": rows}
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
