"""One kernel's GPU time under several launch options, inside its rule's forward+backward, at any shape.

    python -m benchmarks.tune_launch --rules gated_deltanet,deltanet --shapes 4x2048x4x256x256,4x4096x8x128x128 \
        --kernels delta.bwd_dh,delta.fwd_h --options "BV=16,num_warps=4" "BV=32,num_warps=8" "BV=32,num_stages=3"

For every rule, shape (B x T x H x K x V, bf16) and launch key (``momkit.kernels._common.LAUNCH``, as
named in the launchers' ``launch("...")`` calls), the kernel's time per call (torch.profiler) at the
launcher's defaults and under each option set, and the whole forward+backward's GPU time; a set the
kernel cannot launch with (shared memory, registers) is reported and skipped. Then the ten costliest
kernels of the forward+backward at the defaults. Times only: a launch option that goes into a
launcher must pass the GPU tests (benchmarks/gpu_tests.py) first.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks._common import name_list
from benchmarks.kernels import RULES, inputs, kernel_times, ours_fn


def parse_options(text: str) -> dict:
    out = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        if not key or not value.strip().lstrip("-").isdigit():
            raise ValueError(f"launch option {item!r} must look like name=int (e.g. BV=32,num_warps=4)")
        out[key.strip()] = int(value)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from momkit.kernels._common import launch_keys

    ap = argparse.ArgumentParser()
    ap.add_argument("--rules", default="gated_deltanet")
    ap.add_argument("--shapes", default="4x2048x4x256x256", help="comma-separated B x T x H x K x V")
    ap.add_argument("--kernels", default="delta.bwd_dh", help="comma-separated launch keys")
    ap.add_argument("--options", nargs="*", default=[], help='option sets, each "name=int,..."')
    args = ap.parse_args(argv)
    args.rules = name_list(ap, "--rules", args.rules, RULES)
    args.kernels = name_list(ap, "--kernels", args.kernels, launch_keys())
    try:
        args.shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
        args.options = [parse_options(o) for o in args.options]
    except ValueError as e:
        ap.error(str(e) if "launch option" in str(e) else f"--shapes {args.shapes!r}: each must be BxTxHxKxV ints")
    if any(len(s) != 5 or min(s) < 1 for s in args.shapes):
        ap.error(f"--shapes {args.shapes!r}: each must be five positive ints BxTxHxKxV")
    return args


def main() -> None:
    from momkit.kernels import _common

    args = parse_args()
    device = torch.device("cuda")
    for name in args.rules:
        for B, T, H, K, V in args.shapes:
            rule, q, k, v, gates = inputs(name, B, T, H, K, V, device)
            fn = ours_fn(rule, q, k, v, gates, True)
            for key in args.kernels:
                kname = f"_{key.split('.')[1]}_kernel"
                saved = _common.LAUNCH.pop(key, None)
                for opts in [None, *args.options]:
                    _common.LAUNCH.pop(key, None)
                    if opts:
                        _common.LAUNCH[key] = dict(opts)
                    label = f"{name} K{K} {kname} {opts or 'defaults'}"
                    try:
                        kt = kernel_times(fn, 5)
                        total = sum(t for _, t in kt.values())
                        t = kt.get(kname, (0, float("nan")))[1]
                        print(f"{label:<80} {t:8.1f} us   fwd+bwd GPU {total:8.1f} us", flush=True)
                    except Exception as e:  # out of shared memory or registers: report and go on
                        print(f"{label:<80} {type(e).__name__}: {str(e)[:100]}", flush=True)
                _common.LAUNCH.pop(key, None)
                if saved is not None:
                    _common.LAUNCH[key] = saved
            for n, (c, t) in sorted(kernel_times(fn, 5).items(), key=lambda x: -x[1][1])[:10]:
                print(f"    {t:8.1f} us {c}x {n[:90]}")
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
