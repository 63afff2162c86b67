"""GPU benchmark of the MoM layer and the single-memory layer, side by side with fla 0.6.0's layers.

    python -m benchmarks.gpu_layer --out benchmarks/results/gpu_layer_<device>.json [--commit SHA]
        [--cases mom_b4_t2048_m4,...] [--no-fla] [--top 25]
    python -m benchmarks.gpu_layer --report FILE.json[.partial] [--out FILE.json]   # no GPU needed

Public classes as a user builds them, bf16 parameters and inputs, training mode: ``momkit.MoMLayer``
against fla's ``MomAttention`` and ``momkit.SingleMemoryLayer`` against fla's ``GatedDeltaNet``, with
D = 1024, 4 heads of K = V = 256, gated_deltanet, top-2 routing with a shared memory (the MoM paper's
layer). For each case, forward and forward+backward (the backward of ``y`` against a fixed random
cotangent; parameter gradients are cleared before every call, as an optimizer step would):

* wall time per call (median of ``triton.testing.do_bench``; what a user waits, host overhead included),
* GPU time per call (the sum of the kernel times in torch.profiler: what the kernels cost),
* peak memory of one forward+backward above what was allocated before it, and the memory held between
  the forward and the backward (what the graph saves),
* ratios fla / ours (> 1: ours is faster or smaller),

and a per-kernel breakdown (launches and microseconds per call) of both forward+backward passes. fla is only
timed, never used as a reference; fla 0.6.0 refuses its gated backward on Triton < 3.7.1 (fla issue
#640), which the benchmark switches off for timing.
"""

from __future__ import annotations

import argparse
import json
import math
import re

import torch

from benchmarks._common import environment, name_list
from benchmarks.kernels import bench, kernel_times, peak_memory

D, H, HEAD = 1024, 4, 256
# name -> (layer kind, B, T, memories)
CASES = {
    "mom_b4_t2048_m4": ("mom", 4, 2048, 4),
    "mom_b4_t2048_m8": ("mom", 4, 2048, 8),
    "mom_b1_t8192_m4": ("mom", 1, 8192, 4),
    "mom_b16_t2048_m4": ("mom", 16, 2048, 4),
    "single_b4_t2048": ("single", 4, 2048, 1),
}


def ours(kind: str, M: int, device) -> torch.nn.Module:
    from momkit import MoMLayer, SingleMemoryLayer
    from momkit.config import MoMConfig

    mom = kind == "mom"  # the single-memory layer: one memory, nothing to route
    cfg = MoMConfig(hidden_size=D, num_heads=H, head_dim=HEAD, rule="gated_deltanet", num_memories=M,
                    topk=2 if mom else 1, shared_memory=mom)
    layer = MoMLayer(cfg) if kind == "mom" else SingleMemoryLayer(cfg)
    return layer.to(device=device, dtype=torch.bfloat16).train()


def fla_layer(kind: str, M: int, device) -> torch.nn.Module:
    import fla.ops.common.chunk_o

    fla.ops.common.chunk_o.TRITON_ABOVE_3_7_1 = True  # fla 0.6.0 refuses its gated backward on triton 3.6
    if kind == "mom":
        from fla.layers.mom import MomAttention

        layer = MomAttention(hidden_size=D, head_dim=HEAD, num_heads=H, expand_v=1, num_memories=M, topk=2,
                             shared_mem=True)
    else:
        from fla.layers.gated_deltanet import GatedDeltaNet

        layer = GatedDeltaNet(hidden_size=D, head_dim=HEAD, num_heads=H, expand_v=1)
    return layer.to(device=device, dtype=torch.bfloat16).train()


def step_fn(layer: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor, backward: bool):
    params = [p for p in layer.parameters() if p.requires_grad]

    def fn():
        if not backward:
            with torch.no_grad():
                layer(x)
            return
        for p in params:
            p.grad = None
        y = layer(x)[0]
        y.backward(dy)
    return fn


def saved_memory(layer: torch.nn.Module, x: torch.Tensor, device) -> float:
    """MiB held between the forward and the backward: what the graph saves, and the output."""
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    y = layer(x)[0]
    torch.cuda.synchronize(device)
    held = torch.cuda.memory_allocated(device) - base
    del y
    return held / 2**20


def measure(fn, device, rep_ms: int, backward: bool, layer=None, x=None) -> dict:
    fn()
    out = {"ms": bench(fn, rep_ms)}
    kt = kernel_times(fn, 5)
    out["gpu_us"] = sum(t for _, t in kt.values())
    out["launches"] = sum(c for c, _ in kt.values())
    if backward:
        out["peak_mib"] = peak_memory(fn, device)
        out["saved_mib"] = saved_memory(layer, x, device)
    return out, kt


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", help="the results file to write (with --report: the report's rows, summarised)")
    ap.add_argument("--commit", default=None)
    ap.add_argument("--rep", type=int, default=300, help="do_bench repetition time in ms")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--no-fla", action="store_true", help="time ours only")
    ap.add_argument("--top", type=int, default=25, help="kernels listed per breakdown")
    ap.add_argument("--report", metavar="JSON", help="time nothing: print the report of a results file, finished "
                    "or the .partial one a run cut short leaves (the cases it finished)")
    args = ap.parse_args(argv)
    if args.out is None and args.report is None:
        ap.error("--out is required (where the results go), unless --report names a results file to print")
    args.cases = name_list(ap, "--cases", args.cases, CASES)
    if args.top < 1:
        ap.error(f"--top {args.top}: must be >= 1")
    return args


# Where a layer's GPU time goes, by part: the update rule's chunk kernels (ours and fla's), the short
# convolutions, the norms, the matrix products (projections), routing (router, sort, dispatch, combine) and the
# rest (copies, casts, element-wise and reductions). First match wins; names are the profiler's kernel names.
PARTS = (
    ("conv", re.compile(r"_conv_|causal_conv1d")),
    ("norm", re.compile(r"^_rms_|^_l2_|l2norm|layer_norm|rms_norm|rmsnorm")),
    ("matmul", re.compile(r"nvjet|cutlass|gemm|cublas|splitKreduce")),
    ("rule", re.compile(r"^_(wy|fwd|bwd|chunk|prep|coef|state)_|^chunk_|recompute_w_u|prepare_wy|solve_tril|"
                        r"merge_16x16|kkt")),
    ("routing", re.compile(r"sort|[Tt]op[Kk]|gather|scatter|softmax|^_slot|^_combine|^_dispatch|scan|index|"
                           r"cumsum|bitonic|radix")),
)
GATE_ACTIVATIONS = re.compile(r"gdn_gate|beta_sigmoid")  # fla's fused gate activations; ours are element-wise


def kernel_part(name: str) -> str:
    """The part of the layer a kernel belongs to (``PARTS``), else "other"."""
    if GATE_ACTIVATIONS.search(name):
        return "other"
    return next((part for part, pattern in PARTS if pattern.search(name)), "other")


def parts_us(top: list[dict]) -> dict[str, float]:
    """Microseconds per call of each part of a per-kernel breakdown (every part present, 0 where none)."""
    out = {part: 0.0 for part, _ in PARTS} | {"other": 0.0}
    for t in top:
        out[kernel_part(t["kernel"])] += t["us"]
    return {k: round(v, 1) for k, v in out.items()}


def load_results(path: str) -> dict:
    """A results file's content, or one clear error naming it."""
    try:
        with open(path) as f:
            res = json.load(f)
        for key in ("environment", "rows", "breakdown_fwd_bwd", "fla_breakdown_fwd_bwd"):
            res[key]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"--report {path}: not a gpu_layer results file ({type(e).__name__}: {e})") from None
    return res


def write_results(path: str, env: dict, rows: list[dict], breakdowns: dict, fla_breakdowns: dict) -> None:
    with open(path, "w") as f:
        json.dump({"environment": env, "rows": rows, "breakdown_fwd_bwd": breakdowns,
                   "fla_breakdown_fwd_bwd": fla_breakdowns}, f, indent=1,
                  default=lambda v: None if isinstance(v, float) and math.isnan(v) else v)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.report is not None:
        res = load_results(args.report)
        rows = summarise(res["rows"], res["breakdown_fwd_bwd"], res["fla_breakdown_fwd_bwd"])
        if args.out is not None:
            write_results(args.out, res["environment"], rows, res["breakdown_fwd_bwd"], res["fla_breakdown_fwd_bwd"])
        report(res["environment"], rows, res["breakdown_fwd_bwd"], res["fla_breakdown_fwd_bwd"], args.top)
        return
    device = torch.device("cuda")
    env = environment(args.commit, fla=not args.no_fla)
    env.setdefault("fla", None)
    rows = {}
    breakdowns: dict[str, list] = {}  # ours, per case
    fla_breakdowns: dict[str, list] = {}  # fla's, to compare kernel by kernel
    inputs = {}
    for name in args.cases:
        kind, B, T, M = CASES[name]
        torch.manual_seed(0)
        x = torch.randn(B, T, D, device=device, dtype=torch.bfloat16)
        inputs[name] = (x, torch.randn_like(x))
        rows[name] = {"case": name, "layer": kind, "B": B, "T": T, "D": D, "H": H, "K": HEAD, "V": HEAD, "M": M,
                      "topk": 2, "shared": True, "rule": "gated_deltanet", "dtype": "bfloat16"}
    # case by case, ours then fla: a run cut short by a time limit (fla's first calls autotune for more than six
    # minutes on a cold Triton cache at K = 256) still leaves the cases it finished with both sides
    for name in args.cases:
        kind, _, _, M = CASES[name]
        row = rows[name]
        x, dy = inputs[name]
        for who in ["ours"] + (["fla"] if env["fla"] is not None else []):
            try:
                layer = ours(kind, M, device) if who == "ours" else fla_layer(kind, M, device)
            except Exception as e:  # report, don't hide
                row[f"{who}_error"] = f"{type(e).__name__}: {e}"[:300]
                continue
            for mode, backward in (("fwd", False), ("fwd_bwd", True)):
                try:
                    res, kt = measure(step_fn(layer, x, dy, backward), device, args.rep, backward, layer, x)
                except Exception as e:  # report, don't hide: the row says why a number is missing
                    row[f"{who}_{mode}_error"] = f"{type(e).__name__}: {e}"[:300]
                    continue
                row.update({f"{who}_{mode}_{k}": v for k, v in res.items()})
                print(f"{name} {who} {mode}: " + ", ".join(f"{k} {v:.4g}" for k, v in res.items()), flush=True)
                if backward:
                    top = sorted(kt.items(), key=lambda kv: -kv[1][1])
                    (breakdowns if who == "ours" else fla_breakdowns)[name] = [
                        {"kernel": n, "launches": c, "us": round(t, 1)} for n, (c, t) in top]
                # what is done so far survives a time limit (--report prints it)
                write_results(args.out + ".partial", env, list(rows.values()), breakdowns, fla_breakdowns)
            del layer
            torch.cuda.empty_cache()
    rows = summarise(list(rows.values()), breakdowns, fla_breakdowns)
    write_results(args.out, env, rows, breakdowns, fla_breakdowns)
    report(env, rows, breakdowns, fla_breakdowns, args.top)


def summarise(rows: list[dict], breakdowns: dict, fla_breakdowns: dict) -> list[dict]:
    """The rows with their ratios (fla / ours), GPU time by part and MoM over single added."""
    for row in rows:
        for mode in ("fwd", "fwd_bwd"):
            for k, key in (("ms", "wall"), ("gpu_us", "gpu")):
                a, b = row.get(f"fla_{mode}_{k}"), row.get(f"ours_{mode}_{k}")
                if a is not None and b:
                    row[f"ratio_{mode}_{key}"] = a / b
        if row.get("fla_fwd_bwd_peak_mib") and row.get("ours_fwd_bwd_peak_mib"):
            row["ratio_fwd_bwd_memory"] = row["fla_fwd_bwd_peak_mib"] / row["ours_fwd_bwd_peak_mib"]
    for r in rows:
        for who, tables in (("ours", breakdowns), ("fla", fla_breakdowns)):
            if r["case"] in tables:
                r[f"{who}_fwd_bwd_parts_us"] = parts_us(tables[r["case"]])
    single = {r["B"]: r for r in rows if r["layer"] == "single"}
    for r in rows:  # the MoM layer's cost over one memory's (3 writes per token at top-2 + shared)
        s = single.get(r["B"]) if r["layer"] == "mom" and r["T"] == 2048 else None
        if s is not None and s.get("ours_fwd_bwd_gpu_us"):
            r["mom_over_single_fwd_bwd_gpu"] = r["ours_fwd_bwd_gpu_us"] / s["ours_fwd_bwd_gpu_us"]
    return rows


def report(env: dict, rows: list[dict], breakdowns: dict, fla_breakdowns: dict, top_n: int) -> None:
    """Print the table of every case, GPU time by part and both per-kernel breakdowns."""
    single = {r["B"]: r for r in rows if r["layer"] == "single"}
    print(f"\n{env['device']}  torch {env['torch']}  triton {env['triton']}  fla {env['fla']}  commit {env['commit']}")
    hdr = f"{'case':<18}{'mode':<8}{'ours ms':>9}{'fla ms':>9}{'ours GPU':>10}{'fla GPU':>9}{'wall x':>8}{'GPU x':>7}"
    print(hdr + f"{'ours MiB':>10}{'fla MiB':>9}")
    for r in rows:
        for mode in ("fwd", "fwd_bwd"):
            def f(key, scale=1.0, nd=2, r=r):
                v = r.get(key)
                return f"{v * scale:.{nd}f}" if isinstance(v, (int, float)) else "-"
            print(f"{r['case']:<18}{mode:<8}{f(f'ours_{mode}_ms'):>9}{f(f'fla_{mode}_ms'):>9}"
                  f"{f(f'ours_{mode}_gpu_us', 1e-3):>10}{f(f'fla_{mode}_gpu_us', 1e-3):>9}"
                  f"{f(f'ratio_{mode}_wall'):>8}{f(f'ratio_{mode}_gpu'):>7}"
                  + (f"{f('ours_fwd_bwd_peak_mib', 1, 0):>10}{f('fla_fwd_bwd_peak_mib', 1, 0):>9}"
                     if mode == "fwd_bwd" else ""))
    print("\nforward+backward GPU ms by part; / single: each part of our MoM layer over our single-memory layer's")
    for r in rows:
        for who in ("ours", "fla"):
            parts = r.get(f"{who}_fwd_bwd_parts_us")
            if parts is None:
                continue
            line = "  ".join(f"{k} {v / 1e3:.2f}" for k, v in parts.items())
            s = single.get(r["B"]) if who == "ours" and r["layer"] == "mom" and r["T"] == 2048 else None
            if s is not None and s.get("ours_fwd_bwd_parts_us"):
                line += "  | / single: " + "  ".join(f"{k} {v / s['ours_fwd_bwd_parts_us'][k]:.2f}"
                                                      for k, v in parts.items() if s["ours_fwd_bwd_parts_us"][k] > 0)
            print(f"{r['case']:<18}{who:<5} {line}")
    for who, tables in (("ours", breakdowns), ("fla", fla_breakdowns)):
        for name, top in tables.items():
            print(f"\n{who}, {name}, forward+backward, per call (GPU ms {sum(t['us'] for t in top) / 1e3:.2f}):")
            for t in top[:top_n]:
                print(f"  {t['us']:>9.1f} us  {t['launches']:>4}x  {t['kernel'][:110]}")


if __name__ == "__main__":
    main()
