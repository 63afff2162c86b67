"""The official MoM code's parameter sharing and initialisation, as options of the layers.

The official code (OpenSparseLLMs/MoM, the same as fla 0.6.0's ``MomAttention``) shares between memories
what momkit gives each memory by default. With the ``MoMConfig`` keys below the layers hold exactly that
model (docs/mom.md, "Differences from the official code"):

* ``share_decay``: one ``A_log`` and ``dt_bias`` for every memory and the shared one;
* ``share_kv_conv``: one k and one v short convolution for every memory and the shared one;
* ``beta_bias=False``: ``beta = sigmoid(W x)``, no bias;
* ``shared_uses_routed_proj`` (with ``single_kv_proj``): the shared memory uses the routed memories' k, v
  projections and gates;
* ``init="fla"``: ``A ~ U(0, 16)``, every ``nn.Linear`` xavier-uniform with gain ``2 ** -2.5``, zero bias.

Sharing is by identity: the memories' modules hold the same ``nn.Parameter`` (or module), so
``parameters()`` counts it once, its gradient sums every memory's, and the CPU path, the GPU path and
decoding need no change.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from momkit.config import MoMConfig
from momkit.rules.gates import DecayGate, beta_gates, decay_parameters


def _set(module: nn.Module, dotted: str, param: nn.Parameter) -> None:
    *path, name = dotted.split(".")
    for part in path:
        module = getattr(module, part)
    setattr(module, name, param)


def share_memories(memories: list[nn.Module], cfg: MoMConfig) -> None:
    """Apply the sharing options to ``memories`` (``MemoryProjections``, the shared memory last): the
    first memory's parameters become every memory's."""
    first = memories[0]
    for mem in memories:
        if not cfg.beta_bias:
            for gate in beta_gates(mem.gates):
                gate.drop_bias()
    for mem in memories[1:]:
        if mem is first:
            continue
        if cfg.share_decay:
            for name in decay_parameters(first.gates):
                _set(mem.gates, name, first.gates.get_parameter(name))
        if cfg.share_kv_conv:
            mem.k_conv, mem.v_conv = first.k_conv, first.v_conv


def fla_init(module: nn.Module) -> None:
    """fla's ``MomAttention`` initialisation: ``A ~ U(0, 16)`` for every decay, and every ``nn.Linear``
    xavier-uniform with gain ``2 ** -2.5`` and a zero bias (dt_bias keeps momkit's, which is fla's too)."""
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, nn.Linear):
                nn.init.xavier_uniform_(sub.weight, gain=2 ** -2.5)
                if sub.bias is not None:
                    nn.init.zeros_(sub.bias)
            elif isinstance(sub, DecayGate):
                sub.A_log.copy_(torch.empty_like(sub.A_log).uniform_(0, 16).clamp_min(math.ulp(1.0)).log())


def apply_official_options(layer: nn.Module, memories: list[nn.Module], cfg: MoMConfig) -> None:
    """Sharing first, then the init (a shared parameter is initialised once)."""
    share_memories(memories, cfg)
    if cfg.init == "fla":
        fla_init(layer)
