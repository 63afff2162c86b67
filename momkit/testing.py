"""Random inputs for a rule, drawn from each gate's domain (tests, benchmarks and notebooks use them).

    q, k, v, gates = random_inputs(get_rule("gla"), B=2, T=64, H=2, K=16, V=8, dtype=torch.float64)
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from momkit.rules.base import Rule, l2_normalize

Tensor = torch.Tensor
Regime = Literal["typical", "strong_decay", "saturated"]


def random_gates(rule: Rule, B: int, T: int, H: int, K: int, dtype: torch.dtype = torch.float32,
                 regime: Regime = "typical", generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """Gate values from each gate's domain.

    ``typical``: what gate modules produce; ``strong_decay``: log decays around -8 per token and
    unit gates near 0.9; ``saturated``: unit gates (beta, theta, ...) near 1 and mild decays.
    """
    out = {}
    for spec in rule.gates:
        shape = (B, T, H, K) if spec.per_channel else (B, T, H)
        z = torch.randn(shape, generator=generator, dtype=torch.float64)
        if spec.domain == "log_decay":
            x = {"typical": F.logsigmoid(z + 2.0), "strong_decay": -8.0 * torch.sigmoid(z) - 4.0,
                 "saturated": F.logsigmoid(z + 4.0)}[regime]
        elif spec.domain == "unit":
            x = {"typical": torch.sigmoid(z), "strong_decay": torch.sigmoid(z + 2.0),
                 "saturated": 1.0 - 1e-3 * torch.sigmoid(z)}[regime]
        else:
            x = F.softplus(z)
        out[spec.name] = x.to(device=device, dtype=dtype)
    return out


def random_inputs(rule: Rule, B: int, T: int, H: int, K: int, V: int, dtype: torch.dtype = torch.float32,
                  seed: int | None = None, regime: Regime = "typical", device: torch.device | str = "cpu",
                  normalize_k: bool = True) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
    """``(q, k, v, gates)`` with the rule's q/k treatment applied. Keys are L2-normalised for every
    rule unless ``normalize_k=False`` (unit keys keep the delta rules' updates contractive)."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    q = torch.randn(B, T, H, K, generator=gen, dtype=torch.float64)
    k = torch.randn(B, T, H, K, generator=gen, dtype=torch.float64)
    v = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    q, k = rule.prepare_qk(q, k)
    if normalize_k:
        k = l2_normalize(k)
    gates = random_gates(rule, B, T, H, K, dtype, regime, gen, device)
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype), gates
