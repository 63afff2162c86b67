"""GPU benchmark of the Triton kernels, side by side with fla-core 0.6.0 (timed only, never a reference).

    python -m benchmarks.kernels --out benchmarks/results/kernels_<device>.json [--commit SHA] [--quick]
        [--head-dims 128,256]

bf16, B=4, T=4096, 1024 / K heads of K=V=128 (H=8) and of K=V=256 (H=4, the MoM layer's heads),
forward and forward+backward, the median of many runs
(``triton.testing.do_bench``: the time per call as a user sees it, host launch overhead included), and
the GPU kernel time per call (torch.profiler, ``*_gpu_us``). Ratios are fla time / our time, for both
(``ratio_*`` and ``ratio_*_gpu``; targets >= 1.0):

    linear_attn     vs chunk_linear_attn (normalize=False)
    mamba2          vs chunk_simple_gla (g = dt * A folded, dt folded into v, outside the timing)
    gla             vs chunk_gla
    deltanet        vs chunk_delta_rule
    gated_deltanet  vs chunk_gated_delta_rule
    titans          (no fla kernel): target our titans <= 1.5x our gated_deltanet

Also B=1 with T = 16k and 64k (linear scaling; fla there only with --fla-long, its first-call
autotuning takes minutes per rule), peak memory of forward+backward, achieved TFLOP/s
against a measured bf16 matmul and bandwidth against a measured device copy. The FLOP model counts
the chunked algorithm's matrix products (chunk C = 64; per token and head, forward): gated linear
``2C(K+V) + 4KV``, delta ``+ 4CK + 2CV + 2KV``, titans ``8CK + 4CV + 12KV``; forward+backward is
counted as 3x the forward. Bytes are the inputs read once and the outputs written once.
"""

from __future__ import annotations

import argparse
import json
import math

import torch
import triton

from benchmarks._common import environment, name_list
from momkit.rules import get_rule
from momkit.testing import random_inputs

C = 64
PEERS = {"linear_attn": "chunk_linear_attn", "mamba2": "chunk_simple_gla", "gla": "chunk_gla",
         "deltanet": "chunk_delta_rule", "gated_deltanet": "chunk_gated_delta_rule"}
RULES = ["linear_attn", "retnet", "mamba2", "gla", "deltanet", "gated_deltanet", "titans"]


def flops_fwd(rule: str, B: int, T: int, H: int, K: int, V: int) -> float:
    per = 2 * C * (K + V) + 4 * K * V
    if rule in ("deltanet", "gated_deltanet"):
        per += 4 * C * K + 2 * C * V + 2 * K * V
    if rule == "titans":
        per = 8 * C * K + 4 * C * V + 12 * K * V
    return float(B * T * H * per)


def bytes_min(B: int, T: int, H: int, K: int, V: int, backward: bool, elt: int = 2) -> float:
    fwd = 2 * K + 2 * V  # q, k, v read, o written
    bwd = (2 * K + 2 * V) + (2 * K + V)  # q, k, v, do read; dq, dk, dv written
    return float(B * T * H * elt * (fwd + (bwd if backward else 0)))


def ceilings(device) -> dict:
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    t_mm = triton.testing.do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    x = torch.randn(2**28, device=device, dtype=torch.bfloat16)  # 512 MiB
    y = torch.empty_like(x)
    t_cp = triton.testing.do_bench(lambda: y.copy_(x), warmup=50, rep=300, return_mode="median")
    return {"bf16_matmul_tflops": 2 * n**3 / t_mm / 1e9, "copy_tb_per_s": 2 * x.numel() * 2 / t_cp / 1e9}


def inputs(rule_name: str, B: int, T: int, H: int, K: int, V: int, device):
    rule = get_rule(rule_name)
    q, k, v, gates = random_inputs(rule, B, T, H, K, V, torch.bfloat16, seed=0, device="cpu")
    return rule, q.to(device), k.to(device), v.to(device), {n: x.to(device) for n, x in gates.items()}


def rule_options(name: str) -> dict:
    """The rule options every benchmark and diagnostic runs with (titans: mini-batches of 16 tokens)."""
    return {"mini_batch": 16} if name == "titans" else {}


def _clear_grads(leaves) -> None:
    """Drop the inputs' gradients before a backward, so that it writes them rather than adding into the last
    call's (an accumulation kernel per input that is no part of the op's cost)."""
    for x in leaves:
        x.grad = None


def ours_fn(rule, q, k, v, gates, backward: bool):
    opts = rule_options(rule.name)
    leaves = [q, k, v, *gates.values()]
    names = list(gates)
    if backward:
        leaves = [x.detach().requires_grad_(True) for x in leaves]
        do = torch.randn_like(v)

    def fn():
        o, _ = rule.forward(leaves[0], leaves[1], leaves[2], impl="triton", **dict(zip(names, leaves[3:])), **opts)
        if backward:
            _clear_grads(leaves)
            o.backward(do)
    return fn


def fla_fn(rule_name, q, k, v, gates, backward: bool):
    import fla.ops.common.chunk_o

    fla.ops.common.chunk_o.TRITON_ABOVE_3_7_1 = True  # fla 0.6.0 refuses its gated backward on triton 3.6
    from fla.ops.delta_rule import chunk_delta_rule
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    from fla.ops.gla import chunk_gla
    from fla.ops.linear_attn import chunk_linear_attn
    from fla.ops.simple_gla import chunk_simple_gla

    if rule_name == "mamba2":  # fold dt into v, outside the timing; g is already dt * A
        v = (v.float() * gates["dt"][..., None].float()).to(v.dtype)
    args = {"linear_attn": lambda q, k, v: chunk_linear_attn(q, k, v, normalize=False),
            "mamba2": lambda q, k, v: chunk_simple_gla(q, k, v, g=gates["g"]),
            "gla": lambda q, k, v: chunk_gla(q, k, v, g=gates["g"]),
            "deltanet": lambda q, k, v: chunk_delta_rule(q, k, v, gates["beta"]),
            "gated_deltanet": lambda q, k, v: chunk_gated_delta_rule(q, k, v, gates["g"], gates["beta"])}[rule_name]
    leaves = [q, k, v]
    if backward:
        leaves = [x.detach().requires_grad_(True) for x in leaves]
        for n in gates:
            gates[n] = gates[n].detach().requires_grad_(True)
        do = torch.randn_like(v)

    def fn():
        o = args(*leaves)[0]
        if backward:
            _clear_grads([*leaves, *gates.values()])
            o.backward(do)
    return fn


def kernel_times(fn, iters: int = 10) -> dict[str, tuple[int, float]]:
    """Per-kernel (launches per call, microseconds per call) of ``fn``, from torch.profiler."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    agg: dict[str, list] = {}
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            a = agg.setdefault(e.name, [0, 0.0])
            a[0] += 1
            a[1] += e.time_range.elapsed_us()
    return {n: (c // iters, t / iters) for n, (c, t) in agg.items()}


def gpu_us(fn, iters: int = 10) -> float:
    """Microseconds of GPU kernel time per call (the sum over its kernels, torch.profiler): what the
    call costs the GPU without the host's launch overhead, which ``bench`` includes."""
    return sum(t for _, t in kernel_times(fn, iters).values())


def bench(fn, rep_ms: int) -> float:
    return triton.testing.do_bench(fn, warmup=max(25, rep_ms // 4), rep=rep_ms, return_mode="median")


def peak_memory(fn, device) -> float:
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--commit", default=None)
    ap.add_argument("--rep", type=int, default=300, help="do_bench repetition time in ms")
    ap.add_argument("--quick", action="store_true", help="main shapes only")
    ap.add_argument("--head-dims", default="128,256", help="K = V of the main shapes (B4 T4096, H = 1024 / K)")
    ap.add_argument("--fla-long", action="store_true", help="time fla at T = 16k and 64k too")
    ap.add_argument("--rules", default=",".join(RULES))
    ap.add_argument("--peers", default=",".join(PEERS), help="rules whose fla peer is timed (a rule timed in "
                    "another run to compare against our own rules, such as gated_deltanet for titans, needs none)")
    args = ap.parse_args(argv)
    args.rules = name_list(ap, "--rules", args.rules, RULES)
    args.peers = name_list(ap, "--peers", args.peers, PEERS)
    dims = [d.strip() for d in args.head_dims.split(",") if d.strip()]
    if not dims or not all(d.isdigit() and int(d) in (16, 32, 64, 128, 256) for d in dims):
        ap.error(f"--head-dims {args.head_dims!r}: a comma-separated list of 16, 32, 64, 128 or 256")
    args.head_dims = [int(d) for d in dims]
    return args


def main() -> None:
    args = parse_args()
    device = torch.device("cuda")
    env = environment(args.commit, fla=True)
    ceil = ceilings(device)
    print(f"ceilings: bf16 matmul {ceil['bf16_matmul_tflops']:.0f} TFLOP/s, copy {ceil['copy_tb_per_s']:.2f} TB/s")
    shapes = [(4, 4096, 1024 // d, d, d) for d in args.head_dims]
    shapes += [] if args.quick else [(1, 16384, 8, 128, 128), (1, 65536, 8, 128, 128)]
    rows = []
    for B, T, H, K, V in shapes:
        for name in args.rules:
            rule, q, k, v, gates = inputs(name, B, T, H, K, V, device)
            row = {"rule": name, "B": B, "T": T, "H": H, "K": K, "V": V, "dtype": "bfloat16"}
            for mode, backward in (("fwd", False), ("fwd_bwd", True)):
                fn = ours_fn(rule, q, k, v, gates, backward)
                fn()
                t = bench(fn, args.rep)
                row[f"ours_{mode}_ms"] = t
                row[f"ours_{mode}_gpu_us"] = gpu_us(fn)
                fl = flops_fwd(name, B, T, H, K, V) * (3 if backward else 1)
                row[f"ours_{mode}_tflops"] = fl / t / 1e9
                row[f"ours_{mode}_tb_per_s"] = bytes_min(B, T, H, K, V, backward) / t / 1e9
                if backward:
                    row["ours_fwd_bwd_peak_mib"] = peak_memory(fn, device)
                if name in args.peers and env["fla"] is not None and (
                        T == 4096 or args.fla_long):
                    try:
                        ffn = fla_fn(name, q, k, v, dict(gates), backward)
                        ffn()
                        tf = bench(ffn, args.rep)
                        row[f"fla_{mode}_ms"] = tf
                        row[f"ratio_{mode}"] = tf / t
                        row[f"fla_{mode}_gpu_us"] = gpu_us(ffn)
                        row[f"ratio_{mode}_gpu"] = row[f"fla_{mode}_gpu_us"] / row[f"ours_{mode}_gpu_us"]
                        if backward:
                            row["fla_fwd_bwd_peak_mib"] = peak_memory(ffn, device)
                    except Exception as e:  # report, don't hide: the row says why there is no ratio
                        row[f"fla_{mode}_error"] = f"{type(e).__name__}: {e}"[:300]
                torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps({k: (round(x, 4) if isinstance(x, float) else x) for k, x in row.items()}), flush=True)
            with open(args.out + ".partial", "w") as f:  # what is done so far survives a time limit
                json.dump({"environment": env, "ceilings": ceil, "rows": rows}, f, indent=1)
    summary = {}
    for K in args.head_dims:
        main_rows = {r["rule"]: r for r in rows if r["T"] == 4096 and r["K"] == K}
        for name, r in main_rows.items():
            if "ratio_fwd" in r:
                summary[f"{name} K={K}"] = {m: r.get(f"ratio_{m}")
                                            for m in ("fwd", "fwd_bwd", "fwd_gpu", "fwd_bwd_gpu")}
        if "titans" in main_rows and "gated_deltanet" in main_rows:
            t, d = main_rows["titans"], main_rows["gated_deltanet"]
            summary[f"titans_over_gated_deltanet K={K}"] = {
                **{m: t[f"ours_{m}_ms"] / d[f"ours_{m}_ms"] for m in ("fwd", "fwd_bwd")},
                **{f"{m}_gpu": t[f"ours_{m}_gpu_us"] / d[f"ours_{m}_gpu_us"] for m in ("fwd", "fwd_bwd")}}
    result = {"environment": env, "ceilings": ceil, "flop_model": __doc__.split("The FLOP model")[1].strip(),
              "summary": summary, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, default=lambda x: None if isinstance(x, float) and math.isnan(x) else x)
    print("\nsummary (fla time / our time; titans: our titans / our gated_deltanet):")
    for name, s in summary.items():
        print(f"  {name:<34} " + "  ".join(f"{m} {x:.2f}" for m, x in s.items() if x is not None))


if __name__ == "__main__":
    main()
