"""CPU benchmark: a 2-layer MoMLM against the same model with the single-memory mixer.

    python -m benchmarks.cpu_layer [--out benchmarks/results/cpu_layer.json] [--repeats 5] [--allocator tuned]

d=128, T=256, B=32, M=4 memories, top-2, shared memory, forward + backward of the LM loss, per rule.
Timings are interleaved (each repeat times both models), the ratio is the median of per-repeat
ratios. Target (issue 3): MoM costs at most 3x the single-memory model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from benchmarks._common import environment
from momkit import LMConfig, MoMConfig, MoMLM
from momkit.rules import rule_names
from momkit.runtime import cpu_allocator_tuned, tune_cpu_allocator

SHAPE = dict(d=128, T=256, B=32, M=4, k=2, layers=2, vocab=256)


def _model(rule: str, mixer: str) -> MoMLM:
    torch.manual_seed(0)
    mom = MoMConfig(hidden_size=None, num_heads=2, rule=rule, num_memories=SHAPE["M"], topk=SHAPE["k"],
                    shared_memory=True)
    return MoMLM(LMConfig(vocab_size=SHAPE["vocab"], num_layers=SHAPE["layers"], hidden_size=SHAPE["d"],
                          mixer=mixer, mom=mom)).train()


def _step_time(model: MoMLM, x: torch.Tensor) -> float:
    t0 = time.perf_counter()
    out = model(x, labels=x)
    out.loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def bench_rule(rule: str, repeats: int) -> dict:
    x = torch.randint(0, SHAPE["vocab"], (SHAPE["B"], SHAPE["T"]), generator=torch.Generator().manual_seed(0))
    mom, single = _model(rule, "mom"), _model(rule, "single")
    _step_time(mom, x), _step_time(single, x)  # warm-up
    t_mom, t_single, ratios = [], [], []
    for _ in range(repeats):
        tm, ts = _step_time(mom, x), _step_time(single, x)
        t_mom.append(tm)
        t_single.append(ts)
        ratios.append(tm / ts)
    return {"rule": rule, "mom_ms": round(statistics.median(t_mom) * 1e3, 1),
            "single_ms": round(statistics.median(t_single) * 1e3, 1), "ratio": round(statistics.median(ratios), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rules", nargs="*", default=None)
    ap.add_argument("--allocator", choices=["default", "tuned"], default="default")
    args = ap.parse_args()
    if args.allocator == "tuned" and not tune_cpu_allocator():
        raise SystemExit("--allocator tuned: could not tune this C library's allocator (not glibc?)")
    rows = [bench_rule(r, args.repeats) for r in (args.rules or rule_names())]
    print(f"{'rule':<16}{'MoM ms':>10}{'single ms':>11}{'ratio':>8}")
    for r in rows:
        print(f"{r['rule']:<16}{r['mom_ms']:>10}{r['single_ms']:>11}{r['ratio']:>8}")
    worst = max(r["ratio"] for r in rows)
    print(f"largest MoM / single ratio: {worst} (target <= 3)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"benchmark": "cpu_layer", "shape": SHAPE, "repeats": args.repeats,
                       "allocator_tuned": cpu_allocator_tuned(), "target": "MoM fwd+bwd <= 3x single",
                       "met": worst <= 3, **environment(), "rows": rows}, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
