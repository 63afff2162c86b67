"""GPU training throughput of a MoMLM against the same model with fla 0.6.0's ``MomAttention`` as mixers.

    python -m benchmarks.gpu_train --out benchmarks/results/gpu_train_<device>.json [--commit SHA]
        [--batch 8] [--seq-len 2048] [--steps 10] [--no-fla] [--config NAME] [--set KEY=VALUE ...]
        [--kernel-top N] [--host-profile N] [--op-profile N]

The model is by default ``momkit/configs/lm_mom_120m.yaml`` (D = 768, 12 blocks, gated_deltanet, 4 memories top-2 with a
shared memory, 6 heads of K = V = 128), trained as ``momkit train`` trains it: AdamW, bf16 autocast,
gradient clipping at 1.0, one forward+backward+step per batch of random token ids (next-token labels).
The fla twin is the same model with every mixer replaced by ``MomAttention`` of the same sizes; its
router's balance loss is left out (fla's layer returns only the logits), which saves it a little work.
Each model runs ``--warmup`` steps (compilation, autotuning) and then ``--steps`` timed steps; reported:
tokens per second, milliseconds per step, the GPU time per step (sum of kernel times, torch.profiler),
peak memory, and the ratio ours / fla of tokens per second (> 1: ours trains faster). ``--config`` and
``--set`` time another packaged config's model (e.g. ``--config mqar_capacity --batch 256 --seq-len 128
--set model.mixer=single``); ``--kernel-top N`` lists the N kernels with the most GPU time per step.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from benchmarks._common import environment
from benchmarks.kernels import kernel_times


def build_ours(device, config: str = "lm_mom_120m", sets: tuple[str, ...] = ()) -> torch.nn.Module:
    from momkit import MoMLM
    from momkit.config import load_config

    cfg = load_config(config, list(sets))
    return MoMLM(cfg.model).to(device)


class FlaMixer(torch.nn.Module):
    """fla's MomAttention behind the mixer interface of momkit's blocks."""

    def __init__(self, mom, hidden_size: int):
        super().__init__()
        import fla.ops.common.chunk_o

        fla.ops.common.chunk_o.TRITON_ABOVE_3_7_1 = True  # fla 0.6.0 refuses its gated backward on triton 3.6
        from fla.layers.mom import MomAttention

        self.layer = MomAttention(hidden_size=hidden_size, head_dim=mom.key_dim, num_heads=mom.num_heads,
                                  expand_v=mom.expand_v, num_memories=mom.num_memories, topk=mom.topk,
                                  shared_mem=mom.shared_memory)

    def forward(self, x, attention_mask=None, token_ids=None, use_cache=False):
        return self.layer(x)[0], None


def build_fla(device, config: str = "lm_mom_120m", sets: tuple[str, ...] = ()) -> torch.nn.Module:
    model = build_ours("cpu", config, sets)
    mom = model.cfg.resolved_mom()
    for block in model.blocks:
        block.mixer = FlaMixer(mom, model.cfg.hidden_size)
    return model.to(device)


def train_steps(model, batch: int, seq_len: int, vocab: int, device):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    gen = torch.Generator(device=device).manual_seed(0)

    def step():
        ids = torch.randint(0, vocab, (batch, seq_len + 1), device=device, generator=gen)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(ids[:, :-1], labels=ids[:, 1:])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return step


def measure(model, args, device) -> dict:
    step = train_steps(model, args.batch, args.seq_len, model.cfg.vocab_size, device)
    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    kernels = kernel_times(step, 2)
    gpu = sum(t for _, t in kernels.values()) / 1e3
    out = {"ms_per_step": dt * 1e3, "gpu_ms_per_step": gpu, "tokens_per_s": args.batch * args.seq_len / dt,
           "peak_memory_mib": torch.cuda.max_memory_allocated(device) / 2**20,
           "parameters": sum(p.numel() for p in model.parameters()),
           "kernel_launches_per_step": sum(n for n, _ in kernels.values())}
    if args.kernel_top:
        top = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:args.kernel_top]
        out["top_kernels"] = [{"kernel": k[:100], "launches": n, "us": round(t, 1)} for k, (n, t) in top]
    if args.host_profile:
        out["host_top_ops"] = host_profile(step, args.host_profile)
    if args.op_profile:
        out["device_top_ops"] = op_profile(step, args.op_profile)
    return out


def op_profile(step, top: int) -> list[dict]:
    """Which operators launch one training step's GPU time: the ``top`` (operator, calling line) pairs by the
    device time of the kernels they launch themselves (torch.profiler), with their launches; the calling line
    is the innermost frame of momkit or torch.nn code."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
        step()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages(group_by_stack_n=12):
        if e.self_device_time_total <= 0:
            continue
        frames = [f for f in (e.stack or []) if "momkit/" in f or "torch/nn/" in f or "benchmarks/" in f]
        rows.append({"op": e.key[:80], "where": frames[0][-90:] if frames else "", "calls": e.count,
                     "self_device_us": round(e.self_device_time_total, 1)})
    return sorted(rows, key=lambda r: -r["self_device_us"])[:top]


def host_profile(step, top: int) -> list[dict]:
    """Where one training step's host time goes: the ``top`` operators by self CPU time (torch.profiler),
    and the time the host spent waiting for the device inside them."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
        torch.cuda.synchronize()
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
    return [{"op": e.key[:100], "calls": e.count, "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 2)} for e in rows]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--commit", default=None)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--no-fla", action="store_true", help="time ours only")
    ap.add_argument("--host-profile", type=int, default=0, metavar="N",
                    help="also list the N operators with the most host time in one step")
    ap.add_argument("--op-profile", type=int, default=0, metavar="N",
                    help="also list the N operators (with their calling line) whose kernels take the most GPU time")
    ap.add_argument("--kernel-top", type=int, default=0, metavar="N",
                    help="also list the N kernels with the most GPU time per step")
    ap.add_argument("--config", default="lm_mom_120m", help="packaged config (or YAML file) whose model is timed")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override, e.g. model.mixer=single (repeatable)")
    args = ap.parse_args(argv)
    for key in ("host_profile", "kernel_top", "op_profile"):
        if getattr(args, key) < 0:
            ap.error(f"--{key.replace('_', '-')} {getattr(args, key)}: must be >= 0")
    from momkit.config import ConfigError, load_config

    try:
        load_config(args.config, list(args.set))
    except ConfigError as e:
        ap.error(f"--config {args.config} with --set {args.set}: {e}")
    for key in ("batch", "seq_len", "warmup", "steps"):
        if getattr(args, key) < 1:
            ap.error(f"--{key.replace('_', '-')} {getattr(args, key)}: must be >= 1")
    return args


def main() -> None:
    args = parse_args()
    device = torch.device("cuda")
    env = environment(args.commit)
    result = {"environment": env, "config": args.config, "set": args.set, "batch": args.batch,
              "seq_len": args.seq_len, "steps": args.steps}
    builders = {"ours": build_ours} if args.no_fla else {"ours": build_ours, "fla": build_fla}
    for who, build in builders.items():
        model = None
        try:
            model = build(device, args.config, tuple(args.set))
            result[who] = measure(model, args, device)
        except Exception as e:  # report, don't hide
            result[who] = {"error": f"{type(e).__name__}: {e}"[:300]}
        lists = ("host_top_ops", "top_kernels", "device_top_ops")
        print(who, json.dumps({k: v for k, v in result[who].items() if k not in lists}), flush=True)
        for row in result[who].get("top_kernels", []):
            print(f"    {row['us']:9.1f} us  {row['launches']:6d}x  {row['kernel']}")
        for row in result[who].get("host_top_ops", []):
            print(f"    {row['self_cpu_ms']:9.2f} ms  {row['calls']:6d}x  {row['op']}")
        for row in result[who].get("device_top_ops", []):
            print(f"    {row['self_device_us']:9.1f} us  {row['calls']:6d}x  {row['op']:<40} {row['where']}")
        del model
        torch.cuda.empty_cache()
    if "tokens_per_s" in result.get("fla", {}) and "tokens_per_s" in result["ours"]:
        result["ratio_tokens_per_s"] = result["ours"]["tokens_per_s"] / result["fla"]["tokens_per_s"]
        print(f"tokens/s ours / fla: {result['ratio_tokens_per_s']:.2f}")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
