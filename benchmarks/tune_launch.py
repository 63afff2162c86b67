"""One kernel's GPU time under several launch options, inside its rule's forward+backward, at any shape.

    python -m benchmarks.tune_launch --rules gated_deltanet,deltanet --shapes 4x2048x4x256x256,4x4096x8x128x128 \
        --kernels delta.bwd_dh,delta.fwd_h --options "BV=16,num_warps=4" "BV=32,num_warps=8" "BV=32,num_stages=3"

For every rule, shape (B x T x H x K x V, bf16) and launch key (``momkit.kernels._common.LAUNCH``, as
named in the launchers' ``launch("...")`` calls), the kernel's time per call (torch.profiler) at the
launcher's defaults and under each option set, and the whole forward+backward's GPU time; a set the
kernel cannot launch with (shared memory, registers) is reported and skipped. Then the ten costliest
kernels of the forward+backward at the defaults. Times only: a launch option that goes into a
launcher must pass the GPU tests (benchmarks/gpu_tests.py) first.

    python -m benchmarks.tune_launch --conv 8192x3072,24576x2048x5 --kernels conv.bwd --options BC=128 num_warps=8

times the short convolution's forward+backward instead (``--conv``: N rows x C channels [x G groups, each with
its own weight, as the MoM layer's k | v convolution runs], bf16, W = 4, segments of 2048 rows).
"""

from __future__ import annotations

import argparse
import itertools

import torch

from benchmarks._common import name_list, size_list
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
    ap.add_argument("--conv", default=None, metavar="NxC[xG],...",
                    help="time the short convolution at these sizes instead of the rules")
    args = ap.parse_args(argv)
    if args.conv is not None:
        args.conv = size_list(ap, "--conv", args.conv, (2, 3), "sizes NxC or NxCxG of positive integers",
                              "8192x3072,24576x2048x5")
    args.rules = name_list(ap, "--rules", args.rules, RULES)
    args.kernels = name_list(ap, "--kernels", args.kernels, launch_keys())
    args.shapes = size_list(ap, "--shapes", args.shapes, (5,), "sizes B x T x H x K x V of positive integers",
                            "4x2048x4x256x256,4x4096x8x128x128")
    try:
        args.options = [parse_options(o) for o in args.options]
    except ValueError as e:
        ap.error(str(e))
    return args


def conv_fn(N: int, C: int, G: int, device):
    """One forward+backward of the short convolution over ``N`` packed rows (segments of 2048) of ``C`` channels,
    with ``G`` groups of rows each with its own weight (G = 1: one weight, no groups)."""
    from momkit.kernels.short_conv import short_conv

    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(N, C, device=device, generator=gen).to(torch.bfloat16).requires_grad_(True)
    position = torch.arange(N, device=device) % 2048
    cuts = [N * g // G for g in range(G + 1)]
    groups = list(itertools.pairwise(cuts)) if G > 1 else None
    w = torch.randn(*((G,) if G > 1 else ()), C, 4, device=device, generator=gen).requires_grad_(True)
    dy = torch.randn(N, C, device=device, generator=gen).to(torch.bfloat16)

    def fn():
        torch.autograd.grad(short_conv(x, w, position, groups=groups), (x, w), dy)
    return fn


def _cases(args, device):
    """(label, forward+backward) of every case the command line names."""
    if args.conv:
        for size in args.conv:
            N, C, G = (*size, 1)[:3]
            yield f"conv N{N} C{C} G{G}", conv_fn(N, C, G, device)
        return
    for name in args.rules:
        for B, T, H, K, V in args.shapes:
            rule, q, k, v, gates = inputs(name, B, T, H, K, V, device)
            yield f"{name} K{K}", ours_fn(rule, q, k, v, gates, True)


def main() -> None:
    from momkit.kernels import _common

    args = parse_args()
    device = torch.device("cuda")
    for case, fn in _cases(args, device):
        for key in args.kernels:
            family, kernel = key.split(".")
            kname = f"_{'conv_' if family == 'conv' else ''}{kernel}_kernel"
            saved = _common.LAUNCH.pop(key, None)
            for opts in [None, *args.options]:
                _common.LAUNCH.pop(key, None)
                if opts:
                    _common.LAUNCH[key] = dict(opts)
                label = f"{case} {kname} {opts or 'defaults'}"
                try:
                    kt = kernel_times(fn, 5)
                    total = sum(t for _, t in kt.values())
                    # the kernel under its variants' names too (conv.bwd's SHIFT=4 runs _conv_bwd_seq_kernel)
                    mine = [us for name, (_, us) in kt.items() if name.startswith(kname.removesuffix("_kernel"))]
                    t = sum(mine) if mine else float("nan")
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
