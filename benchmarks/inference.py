"""Inference benchmark (the MoM paper's Fig. 2): prefill a context, then decode, for MoM LMs and an
attention LM of the same width and depth; time and memory against the context length.

    python -m benchmarks.inference --out benchmarks/results/inference_h100.json [--commit SHA]   # GPU, full
    python -m benchmarks.inference --size small --contexts 256,1024,4096 --out /tmp/inf.json   # CPU

Models (``--models``): ``mom:<rule>`` (MoMLM, 4 memories, top-2, shared memory), ``mom:<rule>+graph`` (the same
model decoded through one captured CUDA graph per cell, ``momkit.models.graphs``; capture not timed) and
``attention`` (the same LM with causal softmax attention, SDPA). Sizes (``--size``): ``full`` (184M attention, 300M
MoM: d 1024, 12 layers, MoM 4 heads x 256, attention 16 heads x 64, vocab 32000, SwiGLU 8/3), ``small`` (d 128, 2
layers, for CPU), ``tiny`` (a few seconds, for tests). Weights in ``--dtype`` (auto: bfloat16 on CUDA, float32 on
CPU). The command flushes denormal floats to zero (``momkit.runtime.flush_denormals``, as ``momkit`` does).

Each cell (model, context L, batch B):
* batch 1: prefill L random tokens (``last_logits_only``, cache sized for the new tokens), then decode
  ``--new-tokens`` greedy tokens one ``step`` at a time, synchronising after each (per-token latency);
* batch B > 1 (contexts in ``--batch-contexts``): the batch-1 prefill's cache repeated B times (the
  decode cost does not depend on the cached values), then ``--batch-new-tokens`` steps.
Recorded: prefill seconds (batch 1), per-token decode latency (median, p90), decode tokens/s
(B * steps / decode time), time to decode all the steps, and memory: on CUDA the peak allocated during
prefill and during decoding (``torch.cuda.max_memory_allocated``, weights included), on every device
the bytes of the weights and of the decoding cache. A cell that runs out of memory, or whose decoding
passes ``--max-decode-seconds``, is recorded as such (skipped / truncated), and the run goes on. The JSON
and the figure are rewritten after each model, so a run cut short keeps what it measured. The figure:
decode time for the new tokens (a truncated cell: its mean step times the steps) and memory, against the
context length, at batch 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import statistics
import time
from pathlib import Path

import torch

from benchmarks._common import environment, name_list
from momkit import LMConfig, MoMConfig, MoMLM
from momkit.models.graphs import CapturedStep
from momkit.rules import rule_names
from momkit.runtime import flush_denormals

SIZES = {
    "full": dict(vocab=32000, d=1024, layers=12, heads=4, head_dim=256, attention_heads=16, mlp_ratio=8 / 3),
    "small": dict(vocab=256, d=128, layers=2, heads=2, head_dim=64, attention_heads=4, mlp_ratio=8 / 3),
    "tiny": dict(vocab=64, d=32, layers=2, heads=2, head_dim=16, attention_heads=2, mlp_ratio=2.0),
}
GRAPH = "+graph"  # a MoM model decoded through one captured CUDA graph per cell (momkit.models.graphs)
MODELS = [f"mom:{r}" for r in rule_names()] + [f"mom:{r}{GRAPH}" for r in rule_names()] + ["attention"]
DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def build(name: str, size: dict, device: torch.device, dtype: torch.dtype) -> MoMLM:
    """``mom:<rule>`` (``+graph`` decodes the same model captured) or ``attention`` at ``size``, in eval mode."""
    torch.manual_seed(0)
    rule = name.removesuffix(GRAPH).split(":", 1)[1] if name.startswith("mom:") else "gated_deltanet"
    mom = MoMConfig(hidden_size=None, num_heads=size["heads"], head_dim=size["head_dim"], rule=rule,
                    num_memories=4, topk=2, shared_memory=True)
    cfg = LMConfig(vocab_size=size["vocab"], num_layers=size["layers"], hidden_size=size["d"],
                   mixer="attention" if name == "attention" else "mom", mom=mom, mlp_ratio=size["mlp_ratio"],
                   attention_heads=size["attention_heads"])
    return MoMLM(cfg).to(device=device, dtype=dtype).eval()


def tensor_bytes(obj) -> int:
    """Bytes of the tensors in a cache (a list of layer caches, dataclasses of tensors)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, list):
        return sum(tensor_bytes(o) for o in obj)
    if dataclasses.is_dataclass(obj):
        return sum(tensor_bytes(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    return 0


def repeat_cache(cache: list, batch: int) -> list:
    """Every layer cache with each sequence's entries repeated ``batch`` times (batch 1 -> batch)."""
    def rep(c):
        return dataclasses.replace(c, **{f.name: getattr(c, f.name).repeat_interleave(batch, 0)
                                         for f in dataclasses.fields(c)
                                         if isinstance(getattr(c, f.name), torch.Tensor)})
    return [rep(c) for c in cache]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    msg = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in msg or "not enough memory" in msg)


def prefill(model: MoMLM, context: int, capacity: int, device: torch.device) -> tuple[list, torch.Tensor, float]:
    ids = torch.randint(0, model.cfg.vocab_size, (1, context), device=device,
                        generator=torch.Generator(device).manual_seed(context))
    _sync(device)
    t0 = time.perf_counter()
    out = model(ids, use_cache=True, cache_capacity=capacity, last_logits_only=True)
    _sync(device)
    return out.cache, out.logits[:, -1].argmax(-1), time.perf_counter() - t0


def decode(model: MoMLM, cache: list, token: torch.Tensor, steps: int, max_seconds: float,
           device: torch.device, captured: bool = False) -> list[float]:
    """Greedy steps; the latency of each (synchronised). Stops early past ``max_seconds``. ``captured``:
    through one CUDA graph, captured first (not timed)."""
    step = CapturedStep(model, cache) if captured else (lambda t: model.step(t, cache)[0])
    times, start = [], time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        token = step(token).argmax(-1)
        _sync(device)
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > max_seconds:
            break
    return times


def run_cell(model: MoMLM, name: str, context: int, batch: int, steps: int, capacity: int, args,
             device: torch.device) -> dict:
    cell = {"model": name, "context": context, "batch": batch, "steps": steps}
    cache = token = None
    try:
        _free(device)
        _reset_peak(device)
        cache, token, prefill_s = prefill(model, context, capacity, device)
        if batch == 1:
            cell.update(prefill_s=prefill_s, peak_prefill_bytes=_peak(device))
        else:
            cache, token = repeat_cache(cache, batch), token.repeat_interleave(batch, 0)
            _free(device)
        cell["cache_bytes"] = tensor_bytes(cache)
        _reset_peak(device)
        times = decode(model, cache, token, steps, args.max_decode_seconds, device, name.endswith(GRAPH))
        ms = sorted(1e3 * t for t in times)
        cell.update(status="ok" if len(times) == steps else "truncated", steps_done=len(times),
                    decode_s=sum(times), decode_ms_median=statistics.median(ms),
                    decode_ms_p90=ms[min(len(ms) - 1, math.ceil(0.9 * len(ms)) - 1)],
                    tokens_per_s=batch * len(times) / sum(times), peak_decode_bytes=_peak(device))
        if cell["status"] == "truncated":
            cell["reason"] = f"decoding passed --max-decode-seconds={args.max_decode_seconds}"
    except Exception as e:  # out of memory: record and go on; anything else is a bug
        if not _is_oom(e):
            raise
        cell.update(status="skipped", reason="out of memory: " + str(e).strip().splitlines()[0][:200])
    finally:
        del cache, token
        _free(device)
    return cell


def warm_up(model: MoMLM, batches: list[int], device: torch.device, captured: bool = False) -> None:
    """Compile / load every kernel the cells use (prefill, and a few steps at each batch size)."""
    cache, token, _ = prefill(model, 64, 64 + 8, device)
    for b in batches:
        decode(model, repeat_cache(cache, b) if b > 1 else cache, token.repeat_interleave(b, 0), 3, 60.0, device,
               captured)


def _fmt(cell: dict) -> str:
    if cell["status"] == "skipped":
        return f"{cell['model']:<20} L={cell['context']:<7} B={cell['batch']:<3} skipped: {cell['reason']}"
    mem = cell.get("peak_decode_bytes")
    mem = f"peak decode {mem / 2**30:.2f} GiB" if mem is not None else f"cache {cell['cache_bytes'] / 2**20:.3g} MiB"
    pre = f"prefill {cell['prefill_s']:.3f} s  " if "prefill_s" in cell else ""
    return (f"{cell['model']:<20} L={cell['context']:<7} B={cell['batch']:<3} {pre}decode "
            f"{cell['decode_ms_median']:.2f} ms/token (p90 {cell['decode_ms_p90']:.2f}), "
            f"{cell['tokens_per_s']:.0f} tokens/s, {mem}" + (" [truncated]" if cell["status"] == "truncated" else ""))


def plot(result: dict, path: Path) -> None:
    """Two panels at batch 1: decode time for the new tokens, and memory, against the context length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cuda = result["device_type"] == "cuda"
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = plt.get_cmap("tab10").colors
    mem_key = "peak_decode_bytes" if cuda else "cache_bytes"
    done = [c[mem_key] for c in result["cells"] if c["batch"] == 1 and c["status"] != "skipped"]
    unit, scale = ("GiB", 2**30) if max(done, default=0) >= 2**30 else ("MiB", 2**20)
    for i, name in enumerate(result["models"]):
        cells = [c for c in result["cells"] if c["model"] == name and c["batch"] == 1]
        ok = [c for c in cells if c["status"] != "skipped"]
        xs = [c["context"] for c in ok]
        style = dict(color=colours[i % 10], marker="osD^v"[i % 5], label=name)
        ax_t.plot(xs, [c["decode_s"] * c["steps"] / c["steps_done"] for c in ok], **style)
        ax_m.plot(xs, [c[mem_key] / scale for c in ok], **style)
        for c in cells:
            if c["status"] == "skipped":  # out of memory: a cross on the axis
                for ax in (ax_t, ax_m):
                    ax.plot([c["context"]], [0], marker="x", color=colours[i % 10], markersize=10, mew=2)
    steps = result["args"]["new_tokens"]
    ax_t.set_ylabel(f"time to decode {steps} tokens (s)")
    ax_m.set_ylabel(f"peak GPU memory while decoding ({unit})" if cuda else f"decoding cache ({unit})")
    for ax in (ax_t, ax_m):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(f"batch 1, {result['args']['size']} models, {result['environment']['device']} "
                 f"({result['dtype']}); x on the axis: out of memory", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=160)
    plt.close(fig)


def _ints(ap: argparse.ArgumentParser, option: str, value: str) -> list[int]:
    try:
        out = [int(v) for v in value.split(",") if v]
    except ValueError:
        out = []
    if not out or any(v < 1 for v in out):
        ap.error(f"{option} {value!r}: expected comma-separated positive integers")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.inference", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="result JSON; the figure is written next to it (.png)")
    ap.add_argument("--size", default="full", help=f"model size: {', '.join(SIZES)} (default full)")
    ap.add_argument("--models", default=None,
                    help="comma-separated, run in this order (default mom:gated_deltanet,attention,mom:gla, and "
                         "on CUDA mom:gated_deltanet+graph after the first); mom:<rule>+graph: decoded through "
                         "one captured CUDA graph (CUDA only)")
    ap.add_argument("--contexts", default="1024,4096,16384,65536,131072", help="batch-1 context lengths")
    ap.add_argument("--batches", default="1,16,64", help="batch sizes (1 is always run)")
    ap.add_argument("--batch-contexts", default="1024,4096,16384", help="context lengths of the B > 1 cells")
    ap.add_argument("--new-tokens", type=int, default=1024, help="decode steps at batch 1")
    ap.add_argument("--batch-new-tokens", type=int, default=64, help="decode steps at B > 1")
    ap.add_argument("--max-decode-seconds", type=float, default=60.0, help="per cell; then the cell is truncated")
    ap.add_argument("--dtype", default="auto", help=f"{', '.join(DTYPES)} (auto: bfloat16 on CUDA, else float32)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads of torch (default: torch's choice)")
    ap.add_argument("--commit", default=None, help="the commit to record (where the copy has no git history)")
    args = ap.parse_args(argv)
    if args.size not in SIZES:
        ap.error(f"--size {args.size!r}: allowed: {', '.join(SIZES)}")
    if args.dtype not in DTYPES:
        ap.error(f"--dtype {args.dtype!r}: allowed: {', '.join(DTYPES)}")
    if args.device not in (None, "cuda", "cpu"):
        ap.error(f"--device {args.device!r}: allowed: cuda, cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device 'cuda': no CUDA device is available")
    cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    if args.models is None:
        args.models = "mom:gated_deltanet," + ("mom:gated_deltanet+graph," if cuda else "") + "attention,mom:gla"
    args.models = name_list(ap, "--models", args.models, MODELS)
    graphs = [m for m in args.models if m.endswith(GRAPH)]
    if graphs and not cuda:
        ap.error(f"--models {','.join(graphs)}: {GRAPH} (a captured CUDA graph) needs --device cuda")
    args.contexts = _ints(ap, "--contexts", args.contexts)
    args.batches = sorted(set(_ints(ap, "--batches", args.batches)) | {1})
    args.batch_contexts = _ints(ap, "--batch-contexts", args.batch_contexts)
    for option in ("new_tokens", "batch_new_tokens"):
        if getattr(args, option) < 1:
            ap.error(f"--{option.replace('_', '-')} {getattr(args, option)}: must be >= 1")
    if args.threads is not None and args.threads < 1:
        ap.error(f"--threads {args.threads}: must be >= 1")
    if not args.max_decode_seconds > 0:
        ap.error(f"--max-decode-seconds {args.max_decode_seconds}: must be > 0")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype] or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    size = SIZES[args.size]
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = environment(args.commit)
    result = {"environment": env, "device_type": device.type, "dtype": str(dtype).removeprefix("torch."),
              "args": {k: v for k, v in vars(args).items()}, "size": size, "models": args.models, "params": {},
              "cells": []}
    for name in args.models:
        model = build(name, size, device, dtype)
        result["params"][name] = sum(p.numel() for p in model.parameters())
        result.setdefault("weight_bytes", {})[name] = sum(p.numel() * p.element_size() for p in model.parameters())
        print(f"{name}: {result['params'][name]:,} parameters", flush=True)
        with torch.no_grad():
            t0 = time.perf_counter()
            warm_up(model, [b for b in args.batches], device, name.endswith(GRAPH))
            result.setdefault("warm_up_s", {})[name] = time.perf_counter() - t0
            for L in args.contexts:
                for B in args.batches:
                    if B > 1 and L not in args.batch_contexts:
                        continue
                    steps = args.new_tokens if B == 1 else args.batch_new_tokens
                    cell = run_cell(model, name, L, B, steps, L + max(args.new_tokens, args.batch_new_tokens),
                                    args, device)
                    result["cells"].append(cell)
                    print(_fmt(cell), flush=True)
        del model
        _free(device)
        out.write_text(json.dumps(result, indent=1))  # after each model: a partial result survives a crash
        plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return result


if __name__ == "__main__":
    flush_denormals()  # as the momkit command does: decayed states turn denormal, slowing a CPU up to 100x
    main()
