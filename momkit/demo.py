"""The main job as it stands: every rule's chunked path against its token-loop reference.

    python -m momkit.demo

For each registered rule: agreement of ``chunked`` with ``recurrent`` on random inputs (float64:
outputs, final state and input gradients; float32: outputs), and the time of each path.
"""

from __future__ import annotations

import time

import torch

from momkit.rules import get_rule, rule_names
from momkit.testing import random_inputs


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def check_rule(name: str, B: int = 2, T: int = 512, H: int = 2, K: int = 32, V: int = 32) -> dict:
    rule = get_rule(name)
    q, k, v, gates = random_inputs(rule, B, T, H, K, V, torch.float64, seed=0)
    leaves = [x.requires_grad_() for x in (q, k, v, *gates.values())]
    row = {"rule": name}
    results = {}
    for impl in ("recurrent", "chunked"):
        t0 = time.perf_counter()
        o, S = rule.forward(q, k, v, impl=impl, output_final_state=True, **gates)
        grads = torch.autograd.grad(o.square().sum() + S.square().sum(), leaves)
        results[impl] = (o, S, grads, time.perf_counter() - t0)
    (o_r, S_r, g_r, t_r), (o_c, S_c, g_c, t_c) = results["recurrent"], results["chunked"]
    row["out64"] = _max_rel(o_c, o_r)
    row["state64"] = _max_rel(S_c, S_r)
    row["grad64"] = max(_max_rel(a, b) for a, b in zip(g_c, g_r))
    f32 = [x.detach().float() for x in (q, k, v)]
    g32 = {n: x.detach().float() for n, x in gates.items()}
    o32, _ = rule.chunked(*f32, **g32)
    row["out32"] = _max_rel(o32.double(), o_r.detach())
    row["recurrent_ms"], row["chunked_ms"] = t_r * 1e3, t_c * 1e3
    return row


def main() -> None:
    torch.set_grad_enabled(True)
    print("momkit: every rule's chunked path against its recurrent (token-loop) reference")
    print("B=2, T=512, H=2, K=V=32; max relative error; time of forward + backward in float64\n")
    head = (f"{'rule':<16}{'out f64':>10}{'state f64':>11}{'grads f64':>11}{'out f32':>10}"
            f"{'loop ms':>10}{'chunk ms':>10}{'x':>7}")
    print(head)
    print("-" * len(head))
    for name in rule_names():
        r = check_rule(name)
        print(f"{r['rule']:<16}{r['out64']:>10.1e}{r['state64']:>11.1e}{r['grad64']:>11.1e}{r['out32']:>10.1e}"
              f"{r['recurrent_ms']:>10.0f}{r['chunked_ms']:>10.0f}{r['recurrent_ms'] / r['chunked_ms']:>7.1f}")


if __name__ == "__main__":
    main()
