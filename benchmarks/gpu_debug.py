"""Device diagnostics for the kernels: which kernel goes wrong under which launch options, and where the time goes.

    CUDA_LAUNCH_BLOCKING=1 python -m benchmarks.gpu_debug --rule deltanet --shape 70x32x32 \
        [--launch delta.wy_bwd:num_warps=2 ...]
    python -m benchmarks.gpu_debug --profile gated_deltanet,mamba2 [--fla] [--profile-shapes 4x4096x4x256x256,...]
    python -m benchmarks.gpu_debug --check gated_deltanet [--launch ...]
    python -m benchmarks.gpu_debug --tune mamba2:gl.fwd_h,titans:titans.prep [--budget 300]
    python -m benchmarks.gpu_debug --resources gated_deltanet,titans [--resources-shape 4x2048x4x256x256]
        [--sass DIR]     (no GPU needed)

``--profile``: per-kernel GPU time (torch.profiler, CUDA activity) of forward and forward+backward at
the benchmark shape (bf16, B=4, T=4096, H=8, K=V=128) or ``--profile-shapes`` (which ``--tune`` takes too), ours
and, with ``--fla``, fla-core's peer, then every compiled kernel's registers, spills, warps and shared memory.
``--check``: the kernel tests' float64 comparison (tests/kernels) at a few shapes under the given launch options,
and the forward+backward time at the benchmark shape, to try a launch option before it goes into a launcher.
``--tune``: one kernel's time under several (num_warps, num_stages), inside its rule's forward+backward.
``--resources``: runs on a machine without a GPU. Every kernel that a rule's forward and backward
launch at the benchmark shape (or ``--resources-shape``) is compiled for sm_90 (Hopper) instead of
launched, and its resource report is read from the compiler: registers per thread, spill stores and loads
(ptxas -v), shared memory, and from the SASS the matrix instructions (HGMMA: Hopper's warpgroup MMA, needs
>= 4 warps; HMMA: the older per-warp MMA), local-memory accesses (LDL / STL: spills in the instruction
stream), barriers (BAR) and warp shuffles (SHFL: reductions and scans across threads). It reports the Triton
it runs under: compare with the device's (``docs/performance.md`` says how to run it under another).
``conv`` among the names compiles the short convolution as the single layer (q | k | v rows) and the MoM layer
(k | v rows of five memories) run it at that shape, under the launch options given (``--launch`` or
``MOMKIT_LAUNCH``, e.g. ``conv.bwd:SHIFT=4``).

Runs the backward chain of ``DeltaChunk`` kernel by kernel on bf16 inputs and on float32 copies of
them, synchronising after each kernel, and prints for every intermediate whether it is finite, its
largest value and its largest difference from the float32 chain (a debugging comparison, not a
test: the tests compare with the float64 token loop). Launch options (``momkit.kernels._common.LAUNCH``)
can be overridden per kernel; run one configuration per process, since an illegal memory access
poisons the CUDA context.
"""

from __future__ import annotations

import argparse
import itertools

import torch
import triton
from momkit.kernels import _common
from momkit.kernels._common import CHUNK, chunk_meta, dots, launch, launch_keys, parse_launch, pow2
from momkit.kernels.delta import chunk as dc
from momkit.kernels.gated_linear.chunk import bwd_dv

from benchmarks._common import name_list, size_list
from benchmarks.kernels import kernel_times, rule_options
from momkit.rules import get_rule, rule_names
from momkit.testing import random_inputs


def chain(q, k, v, beta, g, do, scale):
    """The steps of DeltaChunk.backward (no initial or final state), returning every intermediate."""
    Ttot, H, K = q.shape
    V = v.shape[-1]
    meta = chunk_meta(1, Ttot, None, CHUNK, q.device)
    gated = g is not None
    out = {}

    def sync(name, x):
        torch.cuda.synchronize()
        out[name] = x
        print(f"  ok: {name}", flush=True)

    Tm, w, u, _, _ = dc.wy_fwd(k, v, beta, g, meta)
    sync("T", Tm)
    sync("w", w)
    _, w, u, u_off, gc = dc.wy_fwd(k, v, beta, g, meta, Tm, u_off=gated)
    dv_local, qk = bwd_dv(q, k, g, None, None, do, None, int(gated), scale, meta, u.dtype, V, no_diag=gated), None
    if gated:
        dv_local, qk = dv_local
    sync("dv_local", dv_local)
    NT = meta.num_chunks
    dh, dv_tot, du_inter, _ = dc.delta_bwd_dh(q, k, w, g, qk, do, dv_local, None, False, scale, meta, gc)
    sync("dh", dh)
    sync("du_inter" if gated else "dv_tot", du_inter if gated else dv_tot)
    h, v_new, _, dovr, _ = dc.delta_fwd_h(k, w, u, g, None, False, meta, gc, (u_off, du_inter, do) if gated else None)
    sync("h", h)
    sync("v_new", v_new)
    BKb, BVb = min(64, pow2(K)), min(64, pow2(V))
    NK = triton.cdiv(K, BKb)
    dq = q.new_empty(q.shape)
    dk_part = q.new_empty(Ttot, H, K, dtype=torch.float32)
    dw = torch.empty_like(w)
    a_part = q.new_empty(NK + 1, Ttot, H, dtype=torch.float32) if gated else None
    s_part = q.new_empty(NK, NT, H, 1, dtype=torch.float32) if gated else None
    n_r = 1 if dovr is None else len(dovr)
    dc._bwd_dqkw_kernel[(NT, H, NK)](q, k, v_new, dovr, g, qk, h, do, dh, dv_tot, dv_local, du_inter, dq, dk_part, dw,
                                     a_part, s_part, meta.cu, meta.chunk_indices, scale, Ttot, n_r, H=H, K=K, V=V,
                                     BT=CHUNK, BK=BKb, BV=BVb, GATED=gated, NR=pow2(n_r), **dots(q.dtype),
                                     **launch("delta.bwd_dqkw"))
    sync("dq", dq)
    sync("dk_part", dk_part)
    sync("dw", dw)
    dk, dv, dbeta, _ = dc.wy_bwd(qk, k, v, beta, g, Tm, do, dw, dv_local if gated else dv_tot, du_inter, dk_part,
                                 None if a_part is None else a_part[NK], scale, meta)
    sync("dk", dk)
    sync("dv", dv)
    sync("dbeta", dbeta)
    return out


def compiled_kernels() -> list[str]:
    """Registers, spills, warps, stages and shared memory of every compiled momkit kernel."""
    import importlib

    rows = []
    for mod in ("gated_linear.chunk", "delta.chunk", "delta.state", "titans.chunk", "titans.backward", "short_conv",
                "norms"):
        m = importlib.import_module(f"momkit.kernels.{mod}")
        for name, fn in vars(m).items():
            caches = getattr(fn, "device_caches", None)
            if not caches:
                continue
            for dev in list(caches):
                for ck in caches[dev][0].values():
                    md = ck.metadata
                    rows.append(f"  {mod.split('.')[0]:<13}{name:<24} warps {md.num_warps} stages {md.num_stages} "
                                f"regs {getattr(ck, 'n_regs', '?'):>3} spills {getattr(ck, 'n_spills', '?'):>5} "
                                f"smem {md.shared:>6}")
    return sorted(rows)


def profile_rules(rules: list[str], with_fla: bool, shapes=((4, 4096, 8, 128, 128),), iters: int = 10) -> None:
    from benchmarks.kernels import PEERS, fla_fn, inputs, ours_fn

    for (B, T, H, K, V), name in itertools.product(shapes, rules):
        rule, q, k, v, gates = inputs(name, B, T, H, K, V, torch.device("cuda"))
        who = ["ours"] + (["fla"] if with_fla and name in PEERS else [])
        for tag in who:
            for bwd in (False, True):
                fn = ours_fn(rule, q, k, v, gates, bwd) if tag == "ours" else fla_fn(name, q, k, v, dict(gates), bwd)
                times = kernel_times(fn, iters)
                total = sum(t for _, t in times.values())
                print(f"\n{name} B{B} T{T} H{H} K{K} V{V} {tag} {'fwd+bwd' if bwd else 'fwd'}: {total:8.1f} us of "
                      "kernels per call")
                for kname, (count, t) in sorted(times.items(), key=lambda x: -x[1][1]):
                    if t >= 0.01 * total:
                        print(f"  {t:8.1f} us {100 * t / total:5.1f}%  x{count:<3} {kname[:90]}")
        torch.cuda.empty_cache()
    print("\ncompiled kernels:")
    print("\n".join(compiled_kernels()))


def tune(items: list[tuple[str, str]], budget_s: float, shapes=((4, 4096, 8, 128, 128),),
         configs=((4, 1), (4, 2), (4, 3), (8, 1), (8, 2), (8, 3), (2, 2))) -> None:
    """Per-kernel GPU time at each shape under other (num_warps, num_stages): ``items`` are
    (rule, launch key), e.g. ``("mamba2", "gl.fwd_h")``; the kernel is timed inside the rule's
    forward+backward (torch.profiler). Timing only: a configuration goes into a launcher after the GPU
    suite passed with it."""
    import time

    from benchmarks.kernels import inputs, ours_fn

    t_end = time.time() + budget_s
    for (B, T, H, K, V), (name, key) in itertools.product(shapes, items):
        item = f"{name}:{key} B{B} T{T} H{H} K{K} V{V}"
        kname = f"_{key.split('.')[1]}_kernel"
        rule, q, k, v, gates = inputs(name, B, T, H, K, V, torch.device("cuda"))
        fn = ours_fn(rule, q, k, v, gates, True)
        saved = _common.LAUNCH.pop(key, None)
        base = kernel_times(fn, 5).get(kname, (0, float("nan")))[1]
        results = [f"default {base:7.1f}"]
        for w, st in configs:
            if time.time() > t_end:
                results.append("(out of time)")
                break
            _common.LAUNCH[key] = {"num_warps": w, "num_stages": st}
            try:
                t = kernel_times(fn, 5).get(kname, (0, float("nan")))[1]
                results.append(f"w{w}s{st} {t:7.1f}")
            except Exception as e:  # out of shared memory or registers: report and go on
                results.append(f"w{w}s{st} {type(e).__name__}")
        _common.LAUNCH.pop(key, None)
        if saved is not None:
            _common.LAUNCH[key] = saved
        print(f"tune {item:<50} us: " + "  ".join(results), flush=True)
        torch.cuda.empty_cache()


def check_rule(name: str) -> None:
    import importlib.util
    import pathlib

    from benchmarks.kernels import bench, inputs, ours_fn

    path = pathlib.Path(__file__).parents[1] / "tests" / "kernels" / "test_chunk_kernels.py"
    spec = importlib.util.spec_from_file_location("kernel_tests", path)
    tests = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tests)
    rule = get_rule(name)
    opts = rule_options(name)
    tag = " ".join(f"{k}:{v}" for k, v in _common.LAUNCH.items()) or "defaults"
    for seed, (B, T, K, V, dtype) in enumerate([(2, 70, 20, 24, torch.bfloat16), (2, 70, 32, 32, torch.bfloat16),
                                                (2, 300, 128, 128, torch.bfloat16), (2, 65, 100, 100, torch.float32),
                                                (2, 130, 256, 64, torch.float16), (2, 200, 64, 64, torch.float32)]):
        leaves = tests.make_leaves(rule, B, T, 2, K, V, dtype, 1000 + seed, "cuda")
        try:
            tests.check_against_reference(rule, opts, leaves, dtype)
            verdict = "pass"
        except AssertionError as e:
            verdict = f"FAIL {str(e)[:150]}"
        print(f"check {name} [{tag}] T{T} K{K} V{V} {str(dtype)[6:]}: {verdict}", flush=True)
    rule, q, k, v, gates = inputs(name, 4, 4096, 8, 128, 128, torch.device("cuda"))
    for bwd in (False, True):
        fn = ours_fn(rule, q, k, v, gates, bwd)
        fn()
        print(f"time {name} [{tag}] {'fwd+bwd' if bwd else 'fwd'}: {bench(fn, 200):.3f} ms", flush=True)


def resource_report(rules: list[str], shape=(4, 4096, 8, 128, 128), sass_dir: str | None = None) -> None:
    """Compile (not run) the kernels of each rule's forward and backward for sm_90 on a machine without
    a GPU (Triton is pointed at a stand-in driver that reports an sm_90 target), and print their
    resource usage."""
    import os
    import re
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.runtime import jit
    from triton.runtime.driver import driver

    from benchmarks.kernels import inputs
    from momkit import kernels

    class _Sm90:  # enough of a driver for Triton to compile for sm_90 and stop before launching
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

    previous = driver._active
    driver.set_active(_Sm90())
    seen: dict[tuple, object] = {}
    current = [""]
    run = jit.JITFunction.run

    def compile_only(self, *args, grid, warmup, **kw):
        ck = run(self, *args, grid=grid, warmup=True, **kw)
        seen.setdefault((current[0], self.fn.__name__, self.fn.__module__, ck.hash), ck)
        return ck

    jit.JITFunction.run = compile_only
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    # newer Triton wheels emit PTX that only their second assembler reads
    ptxas = [p for p in (os.path.join(bin_dir, n) for n in ("ptxas", "ptxas-blackwell")) if os.path.exists(p)]
    B, T, H, K, V = shape
    try:
        for name in rules:
            current[0] = name
            if name == "conv":
                _compile_convs(current, B, T, H, K, V)
                continue
            _, q, k, v, gates = inputs(name, B, T, H, K, V, torch.device("cpu"))
            leaves = [x.requires_grad_(True) for x in (q, k, v, *gates.values())]
            opts = rule_options(name)
            o, _ = kernels.chunk(name, *leaves[:3], dict(zip(gates, leaves[3:])), scale=K**-0.5,
                                 initial_state=None, output_final_state=False, cu_seqlens=None, options=opts)
            o.backward(torch.ones_like(o))
    finally:
        jit.JITFunction.run = run
        driver._active = previous
    print(f"Triton {triton.__version__}, sm_90, B x T x H x K x V = {' x '.join(map(str, shape))}")
    print(f"{'rule':<16}{'kernel':<24}{'module':<14}warps stages  regs  spill st/ld B  smem KiB  HGMMA  HMMA  LDL+STL"
          "   BAR  SHFL")
    with tempfile.TemporaryDirectory() as tmp:
        for n, ((rule, fname, module, _), ck) in enumerate(seen.items()):
            ptx = os.path.join(tmp, "k.ptx")
            with open(ptx, "w") as f:
                f.write(ck.asm["ptx"])
            for exe in ptxas:  # the first that reads this PTX
                run_ptxas = subprocess.run([exe, "-v", "--gpu-name", "sm_90a", ptx, "-o", os.path.join(tmp, "k.cubin")],
                                           capture_output=True, text=True)
                if run_ptxas.returncode == 0:
                    break
            info = run_ptxas.stderr
            regs = re.search(r"Used (\d+) registers", info)
            spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
            cubin = os.path.join(tmp, "t.cubin")
            with open(cubin, "wb") as f:
                f.write(ck.asm["cubin"])
            sass = subprocess.run([os.path.join(bin_dir, "cuobjdump"), "-sass", cubin], capture_output=True,
                                  text=True).stdout
            if sass_dir:
                os.makedirs(sass_dir, exist_ok=True)
                stem = os.path.join(sass_dir, f"{n:02d}.{rule}.{module.split('.')[-2]}.{fname}")
                with open(stem + ".sass", "w") as f:
                    f.write(sass)
                with open(stem + ".ttgir", "w") as f:  # Triton's GPU IR: layouts and their conversions
                    f.write(ck.asm["ttgir"])
            md = ck.metadata
            print(f"{rule:<16}{fname:<24}{module.split('.')[-2]:<14}{md.num_warps:>5} {md.num_stages:>6} "
                  f"{regs.group(1) if regs else '?':>5} {spill.group(1) if spill else '?':>6}/"
                  f"{spill.group(2) if spill else '?':<6} {md.shared / 1024:>8.1f} "
                  f"{len(re.findall(r'HGMMA', sass)):>6} {len(re.findall(r' HMMA', sass)):>5} "
                  f"{len(re.findall(r' (?:LDL|STL)', sass)):>8} {len(re.findall(r' BAR[.]', sass)):>5} "
                  f"{len(re.findall(r'SHFL', sass)):>5}", flush=True)


def _compile_convs(current: list[str], B: int, T: int, H: int, K: int, V: int) -> None:
    """The short convolution's forward and backward as the layers run it at this shape: the single layer's
    q | k | v rows (``conv``: B T rows in three parts, one weight) and the MoM layer's k | v rows (``conv-groups``:
    3 B T rows, top-2 and the shared memory, in five groups of equal rows with their own weights, two parts)."""
    from momkit.kernels.short_conv import short_conv

    position = torch.arange(B * T) % T
    x = torch.randn(B * T, H * (2 * K + V), dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(H * (2 * K + V), 4, requires_grad=True)
    parts = short_conv(x, w, position, split=(H * K, 2 * H * K))
    torch.autograd.backward(list(parts), [torch.ones_like(p) for p in parts])
    current[0] = "conv-groups"
    N = 3 * B * T
    cuts = [N * g // 5 for g in range(6)]
    x = torch.randn(N, H * (K + V), dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(5, H * (K + V), 4, requires_grad=True)
    parts = short_conv(x, w, torch.arange(N) % T, groups=list(itertools.pairwise(cuts)), split=H * K)
    torch.autograd.backward(list(parts), [torch.ones_like(p) for p in parts])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rule", default="deltanet")
    ap.add_argument("--shape", default="70x32x32", help="T x K x V")
    ap.add_argument("--launch", nargs="*", default=[], help="kernel:option=value, e.g. delta.wy_bwd:num_warps=2")
    ap.add_argument("--profile", default=None, help="comma-separated rules to profile at the benchmark shape")
    ap.add_argument("--fla", action="store_true", help="with --profile: fla-core's peers too")
    ap.add_argument("--profile-shapes", default="4x4096x8x128x128", metavar="BxTxHxKxV,...",
                    help="with --profile or --tune: the shapes, comma-separated")
    ap.add_argument("--check", default=None, help="comma-separated rules: float64 checks and timing under --launch")
    ap.add_argument("--tune", default=None, help="comma-separated rule:launch_key items: kernel time per launch option")
    ap.add_argument("--budget", type=float, default=300.0, help="with --tune: seconds")
    ap.add_argument("--resources", default=None,
                    help="comma-separated rules (or conv): sm_90 resource report, no GPU")
    ap.add_argument("--resources-shape", default="4x4096x8x128x128", metavar="BxTxHxKxV",
                    help="with --resources: the shape the kernels are compiled for")
    ap.add_argument("--sass", default=None,
                    help="with --resources: write each kernel's SASS and Triton GPU IR into this folder")
    args = ap.parse_args(argv)
    rules, keys = rule_names(), launch_keys()
    args.rule = name_list(ap, "--rule", args.rule, rules)[0]
    for opt in ("profile", "check"):
        if getattr(args, opt) is not None:
            setattr(args, opt, name_list(ap, f"--{opt}", getattr(args, opt), rules))
    if args.resources is not None:  # conv: the short convolution's kernels as the layers run them
        args.resources = name_list(ap, "--resources", args.resources, [*rules, "conv"])
    args.shape = size_list(ap, "--shape", args.shape, (3,), "three positive integers T x K x V", "70x32x32",
                           one=True)[0]
    args.profile_shapes = size_list(ap, "--profile-shapes", args.profile_shapes, (5,),
                                    "five positive integers B x T x H x K x V per shape", "4x4096x4x256x256")
    args.resources_shape = size_list(ap, "--resources-shape", args.resources_shape, (5,),
                                     "five positive integers B x T x H x K x V", "4x2048x4x256x256", one=True)[0]
    try:
        launch = parse_launch(args.launch, "--launch")
    except ValueError as e:
        ap.error(str(e))
    args.launch = launch
    if args.tune is not None:
        items = []
        for item in args.tune.split(","):
            name, _, key = item.partition(":")
            if name not in rules or key not in keys:
                ap.error(f"--tune {item!r}: expected rule:kernel with rule one of {', '.join(rules)} "
                         f"and kernel one of {', '.join(keys)}")
            items.append((name, key))
        args.tune = items
    return args


def main() -> None:
    args = parse_args()
    for kern, opts in args.launch.items():
        _common.LAUNCH.setdefault(kern, {}).update(opts)
    if args.profile:
        profile_rules(args.profile, args.fla, args.profile_shapes)
        return
    if args.check:
        for name in args.check:
            check_rule(name)
        return
    if args.tune:
        tune(args.tune, args.budget, args.profile_shapes)
        return
    if args.resources:
        resource_report(args.resources, shape=args.resources_shape, sass_dir=args.sass)
        return
    T, K, V = args.shape
    rule = get_rule(args.rule)
    q, k, v, gates = random_inputs(rule, 1, T, 2, K, V, torch.bfloat16, seed=1)
    do = torch.randn(1, T, 2, V).to(torch.bfloat16)

    def flat(x):
        return x.reshape(T, *x.shape[2:]).contiguous().cuda()

    args_b = [flat(x) for x in (q, k, v, gates["beta"])] + [flat(gates["g"]) if "g" in gates else None, flat(do)]
    args_f = [None if x is None else x.float() for x in args_b]
    tag = f"{args.rule} {'x'.join(map(str, args.shape))} {args.launch or 'baseline'}"
    try:
        res_b = chain(*args_b, K**-0.5)
        res_f = chain(*args_f, K**-0.5)
    except Exception as e:  # with CUDA_LAUNCH_BLOCKING=1 the failing launch is the last kernel in the traceback
        import traceback

        where = [f.name for f in traceback.extract_tb(e.__traceback__) if f.filename.endswith("chunk.py")]
        print(f"{tag}: {type(e).__name__} in {where[-1:] or '?'} after {len(where)} frames: {str(e)[:120]}")
        return
    for name in res_b:
        a, b = res_b[name].float(), res_f[name].float()
        print(f"{tag:<48} {name:<9} finite={bool(torch.isfinite(a).all())!s:<5} max={a.abs().max().item():9.3e} "
              f"diff_vs_fp32={(a - b).abs().max().item():9.3e}")


if __name__ == "__main__":
    main()
