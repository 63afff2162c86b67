"""Gate parameterizations: ``nn.Module``s mapping hidden states ``x [B, T, D]`` to a rule's gates.

Inits follow the source papers:
* GLA (Yang et al. 2023): per-channel ``g = logsigmoid(W2 W1 x + b) / 16`` with a rank-16 projection.
* Mamba2 / Gated DeltaNet: ``g = -exp(A_log) * softplus(a(x) + dt_bias)``, ``A ~ U(1, 16)``,
  ``dt`` log-uniform in ``[1e-3, 1e-1]`` (``dt_bias`` is its inverse softplus).
* beta (DeltaNet, Gated DeltaNet): ``sigmoid(b(x))``.
* Titans: ``theta``, ``alpha``, ``eta`` each ``sigmoid(w(x) + bias)`` (bias inits documented in
  docs/rules.md: the paper gives none).
* RetNet: fixed per-head decays ``log(1 - 2^(-5 - h))``, not learned.

Parameters that should not get weight decay (A_log, dt_bias) carry ``_no_weight_decay = True``.

Decoding evaluates the gates of all memories of a layer at once: ``stack_parameters(modules)`` stacks the
parameters and buffers of several modules of one class and configuration on a leading memory axis M, and
``module.forward_stacked(params, x)`` maps ``x [N, D]`` to gates ``[N, M, H]`` / ``[N, M, H, K]`` with one
matrix product per linear map, Gated DeltaNet's decay and beta maps as one (every gate module implements it;
tests compare it with ``forward``). The layers' kernel path evaluates the gates this way too: the MoM layer
for every memory at once, the single layer with ``one_stacked(module)``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from momkit.rules.base import upcast

Tensor = torch.Tensor


def stack_parameters(modules: Sequence[nn.Module]) -> dict[str, Tensor]:
    """Every parameter and buffer of ``modules`` (one class and configuration), by name, stacked on a new
    leading axis: the ``params`` of ``forward_stacked``. Differentiable (``torch.stack``)."""
    named = [dict(_named(m)) for m in modules]
    return {n: torch.stack([d[n] for d in named]) for n in named[0]}


def one_stacked(module: nn.Module) -> dict[str, Tensor]:
    """The ``params`` of ``forward_stacked`` for one module: its parameters and buffers as views with a leading
    axis of 1 (no copies, nothing in the backward)."""
    return {n: t[None] for n, t in _named(module)}


def _named(module: nn.Module):
    return itertools.chain(module.named_parameters(), module.named_buffers())


def _sub(params: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {n[len(prefix):]: t for n, t in params.items() if n.startswith(prefix)}


def _stacked_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x [N, D] through M linear maps at once: weight [M, O, D], bias [M, O] -> [N, M, O] (one matmul)."""
    y = torch.nn.functional.linear(x, weight.flatten(0, 1), None if bias is None else bias.flatten())
    return y.unflatten(-1, tuple(weight.shape[:2]))


class NoGates(nn.Module):
    """For rules without gates (linear attention)."""

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {}

    def forward_stacked(self, params: dict[str, Tensor], x: Tensor) -> dict[str, Tensor]:
        return {}


class SigmoidGates(nn.Module):
    """Several per-head gates in (0, 1): ``sigmoid(W x + bias)``, one linear map for all of them."""

    def __init__(self, hidden_size: int, num_heads: int, bias_init: dict[str, float]):
        super().__init__()
        self.names = tuple(bias_init)
        self.num_heads = num_heads
        self.proj = nn.Linear(hidden_size, num_heads * len(self.names), bias=True)
        with torch.no_grad():
            self.proj.bias.copy_(torch.tensor([bias_init[n] for n in self.names]).repeat_interleave(num_heads))

    def drop_bias(self) -> None:
        """``sigmoid(W x)``: no bias (the official MoM code's beta projection)."""
        self.proj.bias = None

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        z = self.proj(x).sigmoid().unflatten(-1, (len(self.names), self.num_heads))
        return {n: z[..., i, :] for i, n in enumerate(self.names)}

    def forward_stacked(self, params: dict[str, Tensor], x: Tensor) -> dict[str, Tensor]:
        z = _stacked_linear(x, params["proj.weight"], params.get("proj.bias")).sigmoid()
        z = z.unflatten(-1, (len(self.names), self.num_heads))  # [N, M, gates, H]
        return {n: z[..., i, :] for i, n in enumerate(self.names)}


class DecayGate(nn.Module):
    """Mamba2-style data-dependent log decay: returns ``(g, dt)``, ``g = -exp(A_log) * dt`` [B, T, H]."""

    def __init__(self, hidden_size: int, num_heads: int, A_range: tuple[float, float] = (1.0, 16.0),
                 dt_range: tuple[float, float] = (1e-3, 1e-1)):
        super().__init__()
        self.a_proj = nn.Linear(hidden_size, num_heads, bias=False)
        A = torch.empty(num_heads).uniform_(*A_range)
        self.A_log = nn.Parameter(A.log())
        dt = torch.exp(torch.rand(num_heads) * (math.log(dt_range[1]) - math.log(dt_range[0])) + math.log(dt_range[0]))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.A_log._no_weight_decay = True
        self.dt_bias._no_weight_decay = True

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.from_projection(self.a_proj(x), self.A_log, self.dt_bias)

    def forward_stacked(self, params: dict[str, Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
        return self.from_projection(_stacked_linear(x, params["a_proj.weight"]), params["A_log"], params["dt_bias"])

    @staticmethod
    def from_projection(a: Tensor, A_log: Tensor, dt_bias: Tensor) -> tuple[Tensor, Tensor]:
        """``(g, dt)`` from the projection ``a(x)`` (``[..., H]``; ``A_log`` and ``dt_bias`` broadcast to it)."""
        dt = F.softplus(upcast(a) + dt_bias)
        return -upcast(A_log).exp() * dt, dt


class GLAGate(nn.Module):
    """Per-channel log decay ``logsigmoid(W2 W1 x + b) / normalizer`` [B, T, H, K]."""

    def __init__(self, hidden_size: int, num_heads: int, head_k_dim: int, rank: int = 16,
                 normalizer: float = 16.0):
        super().__init__()
        self.shape = (num_heads, head_k_dim)
        self.normalizer = normalizer
        self.down = nn.Linear(hidden_size, rank, bias=False)
        self.up = nn.Linear(rank, num_heads * head_k_dim, bias=True)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        g = F.logsigmoid(upcast(self.up(self.down(x)))) / self.normalizer
        return {"g": g.unflatten(-1, self.shape)}

    def forward_stacked(self, params: dict[str, Tensor], x: Tensor) -> dict[str, Tensor]:
        low = _stacked_linear(x, params["down.weight"]).transpose(0, 1)  # [M, N, rank]
        up = torch.baddbmm(params["up.bias"][:, None], low, params["up.weight"].mT).transpose(0, 1)  # [N, M, H*K]
        g = F.logsigmoid(upcast(up)) / self.normalizer
        return {"g": g.unflatten(-1, self.shape)}


class FixedDecay(nn.Module):
    """RetNet's fixed per-head decays ``log(1 - 2^(-5 - h))``, broadcast to [B, T, H]."""

    def __init__(self, num_heads: int):
        super().__init__()
        self.register_buffer("g", torch.log1p(-(2.0 ** (-5.0 - torch.arange(num_heads, dtype=torch.float)))))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {"g": self.g.expand(*x.shape[:-1], -1)}

    def forward_stacked(self, params: dict[str, Tensor], x: Tensor) -> dict[str, Tensor]:
        return {"g": params["g"].expand(x.shape[0], -1, -1)}


class Mamba2Gates(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.decay = DecayGate(hidden_size, num_heads)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        g, dt = self.decay(x)
        return {"g": g, "dt": dt}

    def forward_stacked(self, params: dict[str, Tensor], x: Tensor) -> dict[str, Tensor]:
        g, dt = self.decay.forward_stacked(_sub(params, "decay."), x)
        return {"g": g, "dt": dt}


class GatedDeltaGates(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.decay = DecayGate(hidden_size, num_heads)
        self.beta = SigmoidGates(hidden_size, num_heads, {"beta": 0.0})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        g, _ = self.decay(x)
        return {"g": g, **self.beta(x)}

    def forward_stacked(self, params: dict[str, Tensor], x: Tensor) -> dict[str, Tensor]:
        # the decay's and beta's projections as one product (one pass over x forward, one for its gradient)
        dec, bet = _sub(params, "decay."), _sub(params, "beta.")
        H = dec["a_proj.weight"].shape[1]
        bias = bet.get("proj.bias")
        if bias is not None:
            bias = torch.cat([torch.zeros_like(bias), bias], 1)
        z = _stacked_linear(x, torch.cat([dec["a_proj.weight"], bet["proj.weight"]], 1), bias)  # [N, M, 2H]
        g, _ = DecayGate.from_projection(z[..., :H], dec["A_log"], dec["dt_bias"])
        return {"g": g, "beta": z[..., H:].sigmoid()}


def decay_parameters(module: nn.Module) -> list[str]:
    """Dotted names of the data-dependent decay's own parameters (``A_log``, ``dt_bias`` of each
    ``DecayGate``) in a gate module: what ``MoMConfig.share_decay`` shares between memories."""
    return [f"{name}.{p}" if name else p for name, sub in module.named_modules() if isinstance(sub, DecayGate)
            for p in ("A_log", "dt_bias")]


def beta_gates(module: nn.Module) -> list[SigmoidGates]:
    """The ``SigmoidGates`` of a gate module that produce ``beta`` alone (deltanet, gated_deltanet)."""
    return [sub for sub in module.modules() if isinstance(sub, SigmoidGates) and sub.names == ("beta",)]
