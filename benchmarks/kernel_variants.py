"""Where a rule's kernel time goes: per-kernel GPU time of textual variants of ``kernels/``.

    python3 -m benchmarks.kernel_variants --spec exp/titans_variants.py --rules titans,gated_deltanet

A spec file is Python defining ``VARIANTS = {name: [(file, old, new), ...]}``: ``file`` relative to
``kernels/``, ``old`` a text that occurs exactly once in it, ``new`` its replacement. Each variant is a
copy of ``kernels/`` with its edits applied, imported as a package of its own (Triton caches unchanged
kernels by their source), and each rule's forward and forward+backward (bf16, by default B=4, T=4096,
H=8, K=V=128; ``--shape``) is profiled per kernel (torch.profiler), with the peak device memory of one call
above what was allocated before it, every variant in the same process.

This is how a kernel's cost is taken apart: a variant that drops a step (removes a store, skips an
inverse, turns a product into an elementwise one) computes wrong values on purpose, and the time it
saves is what the step costs. Timing only; a variant becomes code only through the kernel tests.
A variant named ``base`` with no edits is the unchanged kernels.

``--tree NAME=DIR`` adds another whole ``kernels/`` tree as variant NAME, e.g. an earlier commit's, to time a
change against the code before it in the same process (on a machine without the repository's history):

    mkdir -p /tmp/kernels_before && git archive 126b87d kernels | tar -x -C /tmp/kernels_before --strip-components=1
    python3 -m benchmarks.kernel_variants --tree before=/tmp/kernels_before --spec benchmarks/variants/delta_costs.py \
        --only base --rules gated_deltanet
"""

from __future__ import annotations

import argparse
import importlib
import runpy
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "kernels"


def load_spec(ap: argparse.ArgumentParser, path: str) -> dict[str, list[tuple[str, str, str]]]:
    """``VARIANTS`` of a spec file, checked: one error naming the file and what is wrong."""
    if not Path(path).is_file():
        ap.error(f"--spec {path!r}: no such file")
    variants = runpy.run_path(path).get("VARIANTS")
    if not isinstance(variants, dict) or not variants:
        ap.error(f"--spec {path!r}: defines no VARIANTS dict (name -> [(file, old, new), ...])")
    for name, edits in variants.items():
        ok = isinstance(name, str) and name.isidentifier() and isinstance(edits, list) and all(
            isinstance(e, tuple) and len(e) == 3 and all(isinstance(x, str) for x in e) for e in edits)
        if not ok:
            ap.error(f"--spec {path!r}: variant {name!r} must be an identifier mapped to a list of "
                     "(file, old, new) string triples")
    return variants


def build(name: str, edits: list[tuple[str, str, str]], dest: Path, root: Path = ROOT) -> Path:
    """A copy of ``root`` at ``dest / kv_<name>`` with ``edits`` applied; each ``old`` must occur once."""
    dst = dest / f"kv_{name}"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(root, dst, ignore=shutil.ignore_patterns("__pycache__"))
    for rel, old, new in edits:
        f = dst / rel
        if not f.is_file():
            raise ValueError(f"variant {name}: no file {rel!r} under kernels/")
        text = f.read_text()
        n = text.count(old)
        if n != 1:
            raise ValueError(f"variant {name}: {rel}: {n} occurrences of {old[:80]!r} (need exactly 1)")
        f.write_text(text.replace(old, new))
    return dst


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from momkit.kernels import supported_rules

    from benchmarks._common import name_list

    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", default=None, help="Python file defining VARIANTS")
    ap.add_argument("--tree", action="append", default=[], metavar="NAME=DIR",
                    help="another kernels/ tree, timed as variant NAME (repeatable)")
    ap.add_argument("--rules", default="titans", help="comma-separated rules to profile under every variant")
    ap.add_argument("--only", default=None, help="comma-separated variant names (default: all)")
    ap.add_argument("--dest", default="/tmp/kernel_variants", help="where the variant copies go")
    ap.add_argument("--shape", default="4x4096x8x128x128", help="B x T x H x K x V (bf16)")
    args = ap.parse_args(argv)
    text = args.shape
    try:
        args.shape = tuple(int(x) for x in text.split("x"))
    except ValueError:
        args.shape = ()
    if len(args.shape) != 5 or min(args.shape) < 1:
        ap.error(f"--shape {text!r}: expected five positive integers B x T x H x K x V, e.g. 4x2048x4x256x256")
    args.rules = name_list(ap, "--rules", args.rules, sorted(supported_rules()))
    if args.spec is None and not args.tree:
        ap.error("give --spec FILE, --tree NAME=DIR or both: there is nothing to time")
    args.variants = {} if args.spec is None else load_spec(ap, args.spec)
    args.roots = {}
    for item in args.tree:
        name, _, folder = item.partition("=")
        if not name.isidentifier() or not folder or not (Path(folder) / "__init__.py").is_file():
            ap.error(f"--tree {item!r}: expected NAME=DIR with NAME an identifier and DIR a kernels/ tree (a folder "
                     "with __init__.py)")
        if name in args.variants:
            ap.error(f"--tree {item!r}: the spec has a variant named {name!r} already")
        args.variants[name], args.roots[name] = [], Path(folder)
    if args.only:
        names = name_list(ap, "--only", args.only, args.variants)
        args.variants = {n: args.variants[n] for n in names}
    return args


def main() -> None:
    import torch

    from benchmarks.kernels import inputs, kernel_times, peak_memory, rule_options

    args = parse_args()
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(dest))
    B, T, H, K, V = args.shape
    print(f"device: {torch.cuda.get_device_name()}, shape B={B} T={T} H={H} K={K} V={V} bf16", flush=True)
    data = {name: inputs(name, B, T, H, K, V, "cuda") for name in args.rules}
    do = {name: torch.randn_like(d[3]) for name, d in data.items()}
    for variant, edits in args.variants.items():
        try:
            build(variant, edits, dest, args.roots.get(variant, ROOT))
            importlib.invalidate_caches()
            pkg = importlib.import_module(f"kv_{variant}")
        except Exception as e:  # one bad variant should not cost the others their device time
            print(f"{variant}: FAILED to build: {type(e).__name__}: {e}", flush=True)
            continue
        for name, (_, q, k, v, gates) in data.items():
            opts = rule_options(name)
            for mode in ("fwd", "fwd_bwd"):
                def fn(mode=mode, name=name, q=q, k=k, v=v, gates=gates, opts=opts, pkg=pkg):
                    xs = [x.detach().requires_grad_(mode == "fwd_bwd") for x in (q, k, v, *gates.values())]
                    o, _ = pkg.chunk(name, *xs[:3], dict(zip(gates, xs[3:])), scale=K**-0.5, initial_state=None,
                                     output_final_state=False, cu_seqlens=None, options=opts)
                    if mode == "fwd_bwd":
                        o.backward(do[name])
                try:
                    kt = kernel_times(fn)
                    peak = peak_memory(fn, q.device)
                except Exception as e:
                    print(f"{variant} {name} {mode}: FAILED: {type(e).__name__}: {str(e)[:300]}", flush=True)
                    continue
                print(f"{variant} {name} {mode}: {sum(t for _, t in kt.values()):8.1f} us, peak {peak:7.1f} MiB",
                      flush=True)
                for kn, (c, t) in sorted(kt.items(), key=lambda x: -x[1][1]):
                    print(f"    {t:8.1f} us x{c}  {kn[:90]}", flush=True)


if __name__ == "__main__":
    main()
