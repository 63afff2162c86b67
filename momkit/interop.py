"""Converters between momkit and fla (flash-linear-attention 0.6.0), whose ``MomAttention`` is the official
MoM code's layer (OpenSparseLLMs/MoM).

    from momkit.interop import from_fla, to_fla
    layer = from_fla(fla_mom_attention)     # a momkit.MoMLayer with the official options, same weights
    state = to_fla(layer)                   # fla's state dict of that layer, key for key

``from_fla`` builds a ``MoMLayer`` with the official code's parameter sharing (``share_decay``,
``share_kv_conv``, ``beta_bias=False``, and ``shared_uses_routed_proj`` with ``single_kv_proj``; see
docs/mom.md, "Differences from the official code"): the same number of parameters, the same values, the
same function. ``to_fla`` maps such a layer back; a layer fla cannot express (another rule, per-memory
decays or convolutions, a beta bias, another router) gets one error naming what differs.

Needs the optional dependency ``momkit[interop]`` (flash-linear-attention 0.6.0 and its transformers);
plain momkit does not import it.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from momkit.config import MoMConfig
from momkit.layers.mom import MoMLayer

Tensor = torch.Tensor
FLA_VERSION = "0.6.0"


class InteropError(ValueError):
    """A model or config one side cannot express, or a missing optional dependency."""


@contextlib.contextmanager
def _repository_root_hidden():
    """transformers (which fla's layers import) imports the package index's ``kernels``; this repository's
    top-level ``kernels/`` folder (installed as ``momkit.kernels``) must not stand in for it where the
    repository root is on ``sys.path`` (tests, scripts run from the root)."""
    root = str(Path(__file__).resolve().parents[1])
    hidden = [p for p in sys.path if p in ("", ".", root) or (p and Path(p).resolve() == Path(root))]
    stale = sys.modules.get("kernels")
    if stale is not None and str(getattr(stale, "__file__", "") or "").startswith(root):
        del sys.modules["kernels"]
    sys.path[:] = [p for p in sys.path if p not in hidden]
    try:
        yield
    finally:
        sys.path[:] = hidden + sys.path


def fla_mom_attention() -> type:
    """fla's ``MomAttention`` class (imports fla; an InteropError says how to install it if missing)."""
    try:
        with _repository_root_hidden():
            import fla
            from fla.layers.mom import MomAttention
    except ImportError as e:
        raise InteropError(f"momkit.interop needs flash-linear-attention=={FLA_VERSION} "
                           f"(pip install 'momkit[interop]'): {e}") from None
    if getattr(fla, "__version__", FLA_VERSION) != FLA_VERSION:
        raise InteropError(f"momkit.interop is written against flash-linear-attention {FLA_VERSION}; "
                           f"installed: {fla.__version__}")
    return MomAttention


# ----------------------------------------------------------------------------------- fla -> momkit
def config_from_fla(att: nn.Module) -> MoMConfig:
    """The ``MoMConfig`` of an fla ``MomAttention`` (its layer options, with the official sharing)."""
    unsupported = {
        "use_short_conv": (att.use_short_conv, True),
        "use_output_gate": (att.use_output_gate, True),
        "conv_bias": (att.conv_bias, False),
    }
    for key, (value, needed) in unsupported.items():
        if value != needed:
            raise InteropError(f"fla MomAttention {key}={value!r}: momkit's MoMLayer has only {key}={needed!r}")
    shared = bool(att.shared_mem)
    return MoMConfig(
        hidden_size=att.hidden_size, num_heads=att.num_heads, head_dim=att.head_dim, expand_v=float(att.expand_v),
        rule="gated_deltanet", num_memories=att.num_memories, topk=att.topk, shared_memory=shared,
        router="topk_softmax", router_weights="renormalized", short_conv=True, conv_size=att.conv_size,
        single_kv_proj=bool(att.single_kv_proj), norm_eps=float(att.o_norm.eps), share_decay=True,
        share_kv_conv=True, beta_bias=False, shared_uses_routed_proj=bool(att.single_kv_proj) and shared,
        init="fla",
    ).validate()


def _pairs(layer: MoMLayer) -> list[tuple[str, str]]:
    """(fla state-dict key, momkit parameter name) for every tensor of an official-form layer."""
    cfg = layer.cfg
    pairs = [("q_proj.weight", "q_proj.weight"), ("gate.weight", "router.proj.weight"),
             ("A_log", "memories.0.gates.decay.A_log"), ("dt_bias", "memories.0.gates.decay.dt_bias"),
             ("q_conv1d.weight", "q_conv.weight"), ("k_conv1d.weight", "memories.0.k_conv.weight"),
             ("v_conv1d.weight", "memories.0.v_conv.weight"), ("g_proj.weight", "g_proj.weight"),
             ("o_norm.weight", "o_norm.weight"), ("o_proj.weight", "o_proj.weight")]
    maps = (("k", "k_proj.weight"), ("v", "v_proj.weight"), ("b", "gates.beta.proj.weight"),
            ("a", "gates.decay.a_proj.weight"))
    if cfg.single_kv_proj:
        pairs += [(f"shared_{x}.weight", f"memories.0.{name}") for x, name in maps]
    else:
        pairs += [(f"{x}_proj.{i}.weight", f"memories.{i}.{name}") for i in range(cfg.num_memories)
                  for x, name in maps]
        if cfg.shared_memory:
            pairs += [(f"shared_{x}.weight", f"shared.{name}") for x, name in maps]
    return pairs


def _fla_shape(key: str, t: Tensor) -> Tensor:
    return t[:, None, :] if key.endswith("conv1d.weight") else t  # fla's convs are nn.Conv1d: [C, 1, W]


def from_fla(obj: Any) -> MoMLayer:
    """An fla ``MomAttention`` -> a ``momkit.MoMLayer`` holding the same parameters (copies, in the fla
    layer's dtype and device), with the official code's sharing: the same parameter count and function."""
    MomAttention = fla_mom_attention()
    if not isinstance(obj, MomAttention):
        raise InteropError(f"from_fla takes an fla MomAttention, got {type(obj).__name__}")
    ref = next(obj.parameters())
    layer = MoMLayer(config_from_fla(obj)).to(device=ref.device, dtype=ref.dtype)
    state = obj.state_dict()
    params = dict(layer.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for key, name in _pairs(layer):
            src = state[key]
            params[name].copy_(src[:, 0, :] if key.endswith("conv1d.weight") else src)
    layer.train(obj.training)
    return layer


# ----------------------------------------------------------------------------------- momkit -> fla
def check_fla_expressible(cfg: MoMConfig) -> None:
    """Raise an InteropError naming the first option of ``cfg`` that fla's MomAttention cannot hold."""
    needed = {"rule": "gated_deltanet", "router": "topk_softmax", "router_weights": "renormalized",
              "short_conv": True, "share_decay": True, "share_kv_conv": True, "beta_bias": False,
              "capacity_factor": None, "shared_uses_routed_proj": cfg.single_kv_proj and cfg.shared_memory}
    for key, value in needed.items():
        if getattr(cfg, key) != value:
            raise InteropError(f"{key}={getattr(cfg, key)!r}: fla's MomAttention has only {key}={value!r}")
    if cfg.rule_options:
        raise InteropError(f"rule_options={cfg.rule_options!r}: fla's MomAttention has none")


def to_fla(layer: MoMLayer) -> dict[str, Tensor]:
    """fla's ``MomAttention`` state dict of ``layer`` (an official-form layer, e.g. one from ``from_fla``):
    the same keys, shapes and values as the fla layer it came from."""
    if not isinstance(layer, MoMLayer):
        raise InteropError(f"to_fla takes a momkit MoMLayer, got {type(layer).__name__}")
    check_fla_expressible(layer.cfg)
    params = dict(layer.named_parameters(remove_duplicate=False))
    return {key: _fla_shape(key, params[name].detach().clone()) for key, name in _pairs(layer)}


def fla_kwargs(cfg: MoMConfig) -> dict[str, Any]:
    """The ``MomAttention(...)`` arguments of a layer with ``cfg``."""
    check_fla_expressible(cfg)
    return dict(hidden_size=cfg.hidden_size, head_dim=cfg.key_dim, num_heads=cfg.num_heads, expand_v=cfg.expand_v,
                use_output_gate=True, use_short_conv=True, conv_size=cfg.conv_size, conv_bias=False,
                norm_eps=cfg.norm_eps, num_memories=cfg.num_memories, topk=cfg.topk, shared_mem=cfg.shared_memory,
                single_kv_proj=cfg.single_kv_proj)
