"""Converters between momkit and fla (flash-linear-attention 0.6.0), whose ``MomAttention`` is the official
MoM code's layer (OpenSparseLLMs/MoM).

    from momkit.interop import from_fla, to_fla
    layer = from_fla(fla_mom_attention)     # a momkit.MoMLayer with the official options, same weights
    state = to_fla(layer)                   # fla's state dict of that layer, key for key
    model = from_fla(fla_mom_for_causal_lm) # a momkit.MoMLM; to_fla(model) gives fla's state dict back

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

from momkit.config import ConfigError, LMConfig, MoMConfig
from momkit.layers.mom import MoMLayer
from momkit.models.lm import MoMLM

Tensor = torch.Tensor
FLA_VERSION = "0.6.0"


class InteropError(ConfigError):
    """A model or config one side cannot express, a missing optional dependency, or a bad path."""


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
        with contextlib.suppress(ImportError):  # transformers imports it lazily too: bind the name now
            import kernels  # noqa: F401
        yield
    finally:
        sys.path[:] = hidden + sys.path


def _fla():
    try:
        with _repository_root_hidden():
            import fla
            from fla.layers.mom import MomAttention
            from fla.models.mom import MomConfig, MomForCausalLM
    except ImportError as e:
        raise InteropError(f"momkit.interop needs flash-linear-attention=={FLA_VERSION} "
                           f"(pip install 'momkit[interop]'): {e}") from None
    if getattr(fla, "__version__", FLA_VERSION) != FLA_VERSION:
        raise InteropError(f"momkit.interop is written against flash-linear-attention {FLA_VERSION}; "
                           f"installed: {fla.__version__}")
    return MomAttention, MomConfig, MomForCausalLM


def fla_mom_attention() -> type:
    """fla's ``MomAttention`` class (imports fla; an InteropError says how to install it if missing)."""
    return _fla()[0]


def fla_mom_model() -> tuple[type, type]:
    """fla's ``(MomConfig, MomForCausalLM)`` classes."""
    return _fla()[1:]


# ----------------------------------------------------------------------------------- fla -> momkit
def _official(hidden_size, num_heads, head_dim, expand_v, num_memories, topk, shared, conv_size, single, norm_eps,
              **extra) -> MoMConfig:
    return MoMConfig(
        hidden_size=hidden_size, num_heads=num_heads, head_dim=head_dim, expand_v=float(expand_v),
        rule="gated_deltanet", num_memories=num_memories, topk=topk, shared_memory=bool(shared),
        router="topk_softmax", router_weights="renormalized", short_conv=True, conv_size=conv_size,
        single_kv_proj=bool(single), norm_eps=float(norm_eps), share_decay=True, share_kv_conv=True,
        beta_bias=False, shared_uses_routed_proj=bool(single) and bool(shared), init="fla", **extra,
    )


def _require(what: str, settings: dict[str, tuple[Any, Any]]) -> None:
    for key, (value, needed) in settings.items():
        if value != needed:
            raise InteropError(f"fla {what} {key}={value!r}: momkit holds only {key}={needed!r}")


def config_from_fla(att: nn.Module) -> MoMConfig:
    """The ``MoMConfig`` of an fla ``MomAttention`` (its layer options, with the official sharing)."""
    _require("MomAttention", {"use_short_conv": (att.use_short_conv, True),
                              "use_output_gate": (att.use_output_gate, True), "conv_bias": (att.conv_bias, False)})
    return _official(att.hidden_size, att.num_heads, att.head_dim, att.expand_v, att.num_memories, att.topk,
                     att.shared_mem, att.conv_size, att.single_kv_proj, att.o_norm.eps).validate()


def lm_config_from_fla(config: Any) -> LMConfig:
    """The ``LMConfig`` of an fla ``MomConfig`` (a ``MomForCausalLM`` of MoM layers only)."""
    D = config.hidden_size
    inner = config.intermediate_size
    if inner is None:  # fla's GatedMLP: the multiple of 256 closest above 2/3 * hidden_ratio * hidden_size
        inner = 256 * ((int(D * config.hidden_ratio * 2 / 3) + 255) // 256)
    _require("MomConfig", {"attn": (config.attn, None), "mom_backend": (config.mom_backend, "gated_deltanet"),
                           "hidden_act": (config.hidden_act, "swish"), "use_short_conv": (config.use_short_conv, True),
                           "use_output_gate": (config.use_output_gate, True),
                           "attnres_block_size": (getattr(config, "attnres_block_size", None), None)})
    mom = _official(None, config.num_heads, config.head_dim, config.expand_v, config.num_memories, config.topk,
                    config.shared_mem, config.conv_size, config.single_kv_proj, config.norm_eps,
                    aux_loss_scale=float(config.aux_loss_scale))
    return LMConfig(vocab_size=config.vocab_size, num_layers=config.num_hidden_layers, hidden_size=D, mixer="mom",
                    mom=mom, mlp_ratio=inner / D, tie_embeddings=bool(config.tie_word_embeddings),
                    norm_eps=float(config.norm_eps), initializer_range=float(config.initializer_range)).validate()


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


def _lm_pairs(model: MoMLM) -> list[tuple[str, str]]:
    """(fla key, momkit name) of a MoMLM; the MLP's ``up`` is fla's gate_proj and up_proj stacked (below)."""
    pairs = [("model.embeddings.weight", "embed.weight"), ("model.norm.weight", "norm.weight"),
             ("lm_head.weight", "head.weight")]
    for i, block in enumerate(model.blocks):
        a, b = f"model.layers.{i}.", f"blocks.{i}."
        pairs += [(a + "attn_norm.weight", b + "norm1.weight"), (a + "mlp_norm.weight", b + "norm2.weight"),
                  (a + "mlp.down_proj.weight", b + "mlp.down.weight")]
        pairs += [(a + "attn." + k, b + "mixer." + n) for k, n in _pairs(block.mixer)]
    return pairs


def _load(module: nn.Module, pairs: list[tuple[str, str]], state: dict[str, Tensor]) -> None:
    params = dict(module.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for key, name in pairs:
            src = state[key]
            params[name].copy_(src[:, 0, :] if key.endswith("conv1d.weight") else src)


def from_fla(obj: Any) -> MoMLayer | MoMLM:
    """An fla ``MomAttention`` -> a ``momkit.MoMLayer``, or an fla ``MomForCausalLM`` -> a ``momkit.MoMLM``,
    holding the same parameters (copies, in fla's dtype and device), with the official code's sharing: the
    same parameter count and the same function."""
    MomAttention, _, MomForCausalLM = _fla()
    ref = next(obj.parameters()) if isinstance(obj, nn.Module) else None
    if isinstance(obj, MomAttention):
        out = MoMLayer(config_from_fla(obj)).to(device=ref.device, dtype=ref.dtype)
        _load(out, _pairs(out), obj.state_dict())
    elif isinstance(obj, MomForCausalLM):
        out = MoMLM(lm_config_from_fla(obj.config)).to(device=ref.device, dtype=ref.dtype)
        state = obj.state_dict()
        _load(out, _lm_pairs(out), state)
        with torch.no_grad():
            for i, block in enumerate(out.blocks):
                mlp = f"model.layers.{i}.mlp."
                block.mlp.up.weight.copy_(torch.cat([state[mlp + "gate_proj.weight"], state[mlp + "up_proj.weight"]]))
    else:
        raise InteropError(f"from_fla takes an fla MomAttention or MomForCausalLM, got {type(obj).__name__}")
    return out.train(obj.training)


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


def check_fla_lm_expressible(cfg: LMConfig) -> None:
    """Raise an InteropError naming the first setting of a model ``cfg`` fla's MomForCausalLM cannot hold."""
    if cfg.mixer != "mom" or cfg.attention_every:
        raise InteropError(f"mixer={cfg.mixer!r}, attention_every={cfg.attention_every}: fla's MomForCausalLM here "
                           "holds MoM layers only")
    mom = cfg.resolved_mom()
    check_fla_expressible(mom)
    if mom.layerwise_balance or mom.z_loss_scale:
        raise InteropError("layerwise_balance / z_loss_scale: fla's MomForCausalLM has one balancing loss over "
                           "all layers and no z-loss")


def to_fla(obj: MoMLayer | MoMLM) -> dict[str, Tensor]:
    """fla's state dict of a ``MoMLayer`` (``MomAttention``) or a ``MoMLM`` (``MomForCausalLM``) in the
    official form (e.g. from ``from_fla``): the same keys, shapes and values as the fla object it came from."""
    if isinstance(obj, MoMLayer):
        check_fla_expressible(obj.cfg)
        pairs = _pairs(obj)
    elif isinstance(obj, MoMLM):
        check_fla_lm_expressible(obj.cfg)
        pairs = _lm_pairs(obj)
    else:
        raise InteropError(f"to_fla takes a momkit MoMLayer or MoMLM, got {type(obj).__name__}")
    params = dict(obj.named_parameters(remove_duplicate=False))
    state = {key: _fla_shape(key, params[name].detach().clone()) for key, name in pairs}
    if isinstance(obj, MoMLM):
        for i, block in enumerate(obj.blocks):
            gate, up = block.mlp.up.weight.detach().clone().chunk(2)
            state[f"model.layers.{i}.mlp.gate_proj.weight"] = gate.contiguous()
            state[f"model.layers.{i}.mlp.up_proj.weight"] = up.contiguous()
    return state


def fla_config(cfg: LMConfig) -> Any:
    """fla's ``MomConfig`` of a model with ``cfg`` (build it with ``MomForCausalLM(fla_config(cfg))``)."""
    check_fla_lm_expressible(cfg)
    MomConfig, _ = fla_mom_model()
    mom = cfg.resolved_mom()
    inner = round(cfg.hidden_size * cfg.mlp_ratio)
    return MomConfig(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers, vocab_size=cfg.vocab_size,
                     num_heads=mom.num_heads, head_dim=mom.key_dim, expand_v=mom.expand_v, conv_size=mom.conv_size,
                     intermediate_size=inner, norm_eps=cfg.norm_eps, num_memories=mom.num_memories, topk=mom.topk,
                     shared_mem=mom.shared_memory, single_kv_proj=mom.single_kv_proj,
                     aux_loss_scale=mom.aux_loss_scale, tie_word_embeddings=cfg.tie_embeddings,
                     initializer_range=cfg.initializer_range, fuse_norm=False, fuse_swiglu=False,
                     fuse_cross_entropy=False)


def fla_kwargs(cfg: MoMConfig) -> dict[str, Any]:
    """The ``MomAttention(...)`` arguments of a layer with ``cfg``."""
    check_fla_expressible(cfg)
    return dict(hidden_size=cfg.hidden_size, head_dim=cfg.key_dim, num_heads=cfg.num_heads, expand_v=cfg.expand_v,
                use_output_gate=True, use_short_conv=True, conv_size=cfg.conv_size, conv_bias=False,
                norm_eps=cfg.norm_eps, num_memories=cfg.num_memories, topk=cfg.topk, shared_mem=cfg.shared_memory,
                single_kv_proj=cfg.single_kv_proj)


# ----------------------------------------------------------------------------------- checkpoints
def convert(src: str | Path, dst: str | Path) -> str:
    """Convert a saved model between an fla / Hugging Face folder of a MoM model (``config.json`` with
    ``model_type: mom`` and its weights) and a momkit run directory (``config.yaml`` and ``last.pt``),
    in the direction ``src`` says. ``dst`` must not exist. Returns a one-line summary.

    A converted run directory holds the model only (``last.pt`` with ``model``; no optimizer state, so it
    cannot be resumed) and the default task, which is not the model's: load it with
    ``momkit.train.load_run(dst, validate_task=False)``."""
    import json

    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise InteropError(f"SRC={str(src)!r} is not a folder (a momkit run directory or an fla model folder)")
    if dst.exists():
        raise InteropError(f"DST={str(dst)!r} exists: name a new folder (convert overwrites nothing)")
    if (src / "config.yaml").is_file():
        from momkit.train import load_run

        _, model = load_run(src, validate_task=False)
        check_fla_lm_expressible(model.cfg)
        _, MomForCausalLM = fla_mom_model()
        fla_model = MomForCausalLM(fla_config(model.cfg))
        fla_model.load_state_dict(to_fla(model))
        with _repository_root_hidden():
            fla_model.save_pretrained(str(dst))
        return f"momkit run {src} -> fla MomForCausalLM folder {dst}"
    if (src / "config.json").is_file():
        try:
            model_type = json.loads((src / "config.json").read_text()).get("model_type")
        except (json.JSONDecodeError, AttributeError):
            raise InteropError(f"SRC={str(src)!r}: config.json is not a JSON object") from None
        if model_type != "mom":
            raise InteropError(f"SRC={str(src)!r} holds a {model_type!r} model: convert takes fla's MoM models "
                               "(model_type mom)")
        _, MomForCausalLM = fla_mom_model()
        try:
            with _repository_root_hidden():
                fla_model = MomForCausalLM.from_pretrained(str(src))
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InteropError(f"SRC={str(src)!r} cannot be loaded: {first}") from None
        model = from_fla(fla_model)
        from momkit.config import TrainConfig, config_to_yaml

        cfg = TrainConfig(model=model.cfg)
        cfg.run.dir = str(dst)
        dst.mkdir(parents=True)
        (dst / "config.yaml").write_text(config_to_yaml(cfg))
        torch.save({"model": model.state_dict(), "converted_from": str(src)}, dst / "last.pt")
        return f"fla MomForCausalLM folder {src} -> momkit run {dst} (model only)"
    raise InteropError(f"SRC={str(src)!r} is neither a momkit run directory (config.yaml) nor an fla model folder "
                       "(config.json)")
