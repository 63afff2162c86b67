"""Peak memory of our layers' GPU path, simulated on a machine without a GPU.

    python -m benchmarks.cpu_memory [--cases mom_b4_t2048_m4,...] [--budget-mib 64] [--slots 132]

The cases and layers of ``benchmarks/gpu_layer.py`` (bf16, training mode). Each runs the Triton path under the
interpreter with every kernel launch stubbed out: the launchers still allocate their outputs and buffers,
and the torch ops between them run (on the CPU, so routing is real), but no kernel computes. The profiler's
CPU allocator events give the same two figures as ``gpu_layer``: the peak of one forward+backward above what
was allocated before it, and what the forward leaves held for the backward. At the default budget it read
760, 776, 820, 3029 and 398 MiB for the five cases at 7e7db1b, against that commit's 736, 735, 793, 3005 and 387
on an H100 (``benchmarks/results/gpu_layer_h100_7e7db1b.json``): within 6 %, and high, as it should read: the profiler
does not see blocks allocated before it started being freed, so the parameter gradients that the call
replaces count twice, and the CUDA allocator rounds blocks differently. Each case runs in a fresh process
(one thread, no cycle collection during the call, fixed weights and inputs): after another case in the same
process, what that one left cached moved the grouped B1 T8192 reading between 772 and 820 MiB.
``--slots`` is the number of programs the delta state passes run at once (an H100's SMs; the CPU reports
one), which the grouping of the delta kernels reads; ``--budget-mib`` overrides their state budget.
"""

from __future__ import annotations

import argparse
import gc
import os

import torch

from benchmarks._common import name_list
from benchmarks.gpu_layer import CASES, D


def simulate(kind: str, B: int, T: int, M: int) -> dict:
    """``{"peak_mib", "saved_mib"}`` of one forward+backward of our layer (kernels not run)."""
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.gpu_layer import ours

    torch.manual_seed(0)  # the layer's weights, hence the routing and the groups of the delta kernels
    layer = ours(kind, M, torch.device("cpu"))
    layer.cfg.impl = "triton"
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, D, generator=gen).to(torch.bfloat16)
    dy = torch.randn(B, T, D, generator=gen).to(torch.bfloat16)
    params = [p for p in layer.parameters() if p.requires_grad]
    held = []

    def step(backward: bool = True):
        for p in params:
            p.grad = None
        y = layer(x)[0]
        if backward:
            y.backward(dy)
        else:
            held.append(y)

    def net_and_peak(fn) -> tuple[float, float]:
        gc.collect()  # no cycle collection inside the measured call: it would free at a random moment
        gc.disable()
        try:
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                fn()
        finally:
            gc.enable()
        events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                        if e.name() == "[memory]")
        run = peak = 0
        for _, n in events:
            run += n
            peak = max(peak, run)
        return run / 2**20, peak / 2**20

    step()  # parameter gradients exist before the measured call, as in gpu_layer
    _, peak = net_and_peak(step)
    saved, _ = net_and_peak(lambda: step(backward=False))
    return {"peak_mib": peak, "saved_mib": saved}


class _NoKernels:
    """The interpreter with every launch a no-op, and the state passes' program slots of a GPU."""

    def __init__(self, slots: int, budget_mib: int | None):
        self.slots, self.budget = slots, budget_mib

    def __enter__(self):
        import momkit.kernels.delta.chunk as delta_chunk
        import triton.runtime.interpreter as interpreter

        self.saved = [(interpreter.InterpretedFunction, "run", interpreter.InterpretedFunction.run),
                      (delta_chunk, "program_slots", delta_chunk.program_slots),
                      (delta_chunk, "STATE_BUDGET", delta_chunk.STATE_BUDGET)]
        interpreter.InterpretedFunction.run = lambda self, *args, **kwargs: None
        delta_chunk.program_slots = lambda device: self.slots
        if self.budget is not None:
            delta_chunk.STATE_BUDGET = self.budget * 2**20
        return self

    def __exit__(self, *exc):
        for owner, name, value in self.saved:
            setattr(owner, name, value)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--slots", type=int, default=132, help="programs at once in a state pass (H100: 132 SMs)")
    ap.add_argument("--budget-mib", type=int, default=None, help="the delta kernels' state budget (MiB)")
    args = ap.parse_args(argv)
    args.cases = name_list(ap, "--cases", args.cases, CASES)
    if args.slots < 1:
        ap.error(f"--slots {args.slots}: expected a positive integer")
    if args.budget_mib is not None and args.budget_mib < 1:
        ap.error(f"--budget-mib {args.budget_mib}: expected a positive integer")
    return args


def _case(name: str, slots: int, budget_mib: int | None) -> dict:
    torch.set_num_threads(1)  # one thread allocates: the order of allocations and frees is the program's
    with _NoKernels(slots, budget_mib):
        return simulate(*CASES[name])


def main(argv: list[str] | None = None) -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    args = parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("benchmarks.cpu_memory: run with TRITON_INTERPRET=1 (the kernels' CPU interpreter)")
    print(f"{'case':<18}{'peak MiB':>10}{'saved MiB':>11}")
    for name in args.cases:  # each case in a fresh process: what one leaves cached would change the next's reading
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            out = pool.submit(_case, name, args.slots, args.budget_mib).result()
        print(f"{name:<18}{out['peak_mib']:>10.0f}{out['saved_mib']:>11.0f}", flush=True)


if __name__ == "__main__":
    main()
