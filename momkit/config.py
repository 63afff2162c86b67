"""Configuration: dataclass configs, their validation, and ConfigError.

Every invalid value raises ``ConfigError`` (a ``ValueError``) naming the key, the bad value and what
is allowed, before any work starts. The dataclasses use only types OmegaConf understands, so they
double as structured configs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """An invalid configuration value: the message names the key, the value and what is allowed."""


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: {allowed}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class MoMConfig:
    """A Mixture-of-Memories layer (see docs/mom.md). ``head_dim`` is the per-head key size
    (default hidden_size // num_heads); values have ``head_dim * expand_v`` channels per head."""

    hidden_size: int | None = 256
    num_heads: int = 4
    head_dim: int | None = None
    expand_v: float = 1.0
    rule: str = "gated_deltanet"
    rule_options: dict[str, Any] = field(default_factory=dict)
    num_memories: int = 4
    topk: int = 2
    shared_memory: bool = True
    router: str = "topk_softmax"
    router_noise_std: float = 0.0
    router_bias_update_rate: float = 1e-3
    short_conv: bool = True
    conv_size: int = 4
    capacity_factor: float | None = None
    single_kv_proj: bool = False
    aux_loss_scale: float = 0.01
    z_loss_scale: float = 0.0
    layerwise_balance: bool = False
    chunk_size: int = 64
    impl: str = "auto"
    norm_eps: float = 1e-6

    @property
    def key_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @property
    def value_dim(self) -> int:
        return round(self.key_dim * self.expand_v)

    def validate(self, prefix: str = "") -> MoMConfig:
        from momkit.routing import router_names
        from momkit.rules import get_rule, rule_names
        from momkit.rules.base import IMPLS

        p = prefix
        _check(self.hidden_size is not None, f"{p}hidden_size", self.hidden_size, "required (a positive int)")
        for key in ("hidden_size", "num_heads", "num_memories", "topk", "chunk_size"):
            val = getattr(self, key)
            _check(_is_int(val) and val >= 1, p + key, val, "must be a positive int")
        if self.head_dim is None:
            _check(self.hidden_size % self.num_heads == 0, f"{p}num_heads", self.num_heads,
                   f"hidden_size={self.hidden_size} must be divisible by num_heads (or set head_dim)")
        else:
            _check(_is_int(self.head_dim) and self.head_dim >= 1, f"{p}head_dim", self.head_dim,
                   "must be a positive int or None")
        _check(_is_num(self.expand_v) and self.expand_v > 0, f"{p}expand_v", self.expand_v, "must be > 0")
        vd = self.key_dim * self.expand_v
        _check(abs(vd - round(vd)) < 1e-9 and round(vd) >= 1, f"{p}expand_v", self.expand_v,
               f"head_dim * expand_v = {self.key_dim} * {self.expand_v} must be a whole number >= 1")
        _check(self.rule in rule_names(), f"{p}rule", self.rule, f"valid rules: {', '.join(rule_names())}")
        rule = get_rule(self.rule)
        unknown = sorted(set(self.rule_options) - set(rule.options))
        _check(not unknown, f"{p}rule_options", dict(self.rule_options),
               f"rule {self.rule!r} has options {sorted(rule.options) or 'none'}; unknown: {unknown}")
        try:
            rule._check_options({**rule.options, **self.rule_options})
        except ValueError as e:
            raise ConfigError(f"{p}rule_options={dict(self.rule_options)!r} is invalid: {e}") from None
        _check(self.router in router_names(), f"{p}router", self.router,
               f"valid routers: {', '.join(router_names())}")
        _check(self.topk <= self.num_memories, f"{p}topk", self.topk,
               f"must be <= num_memories={self.num_memories}")
        if self.router == "dense":
            _check(self.topk == self.num_memories, f"{p}topk", self.topk,
                   f"router 'dense' sends every token to all num_memories={self.num_memories} memories; "
                   f"set topk={self.num_memories}")
        _check(self.capacity_factor is None or (_is_num(self.capacity_factor) and self.capacity_factor > 0),
               f"{p}capacity_factor", self.capacity_factor, "must be None or > 0")
        _check(_is_int(self.conv_size) and self.conv_size >= 1, f"{p}conv_size", self.conv_size,
               "must be a positive int")
        for key in ("aux_loss_scale", "z_loss_scale", "router_noise_std", "router_bias_update_rate"):
            val = getattr(self, key)
            _check(_is_num(val) and val >= 0, p + key, val, "must be a number >= 0")
        _check(_is_num(self.norm_eps) and self.norm_eps > 0, f"{p}norm_eps", self.norm_eps, "must be > 0")
        _check(self.impl in IMPLS, f"{p}impl", self.impl, f"one of {', '.join(IMPLS)}")
        for key in ("shared_memory", "short_conv", "single_kv_proj", "layerwise_balance"):
            _check(isinstance(getattr(self, key), bool), p + key, getattr(self, key), "must be true or false")
        return self


MIXERS = ("mom", "single", "attention")


@dataclass
class LMConfig:
    """A language model: embedding -> blocks [RMSNorm -> mixer -> residual -> RMSNorm -> SwiGLU ->
    residual] -> RMSNorm -> (tied) head. ``mixer``: "mom", "single" (the same rule with one memory)
    or "attention" (causal softmax attention with rotary positions). ``attention_every = n > 0``
    makes every n-th block an attention block (hybrid). ``mom.hidden_size`` may be left None: it is
    the model's ``hidden_size``."""

    vocab_size: int = 256
    num_layers: int = 2
    hidden_size: int = 256
    mixer: str = "mom"
    mom: MoMConfig = field(default_factory=lambda: MoMConfig(hidden_size=None))
    mlp_ratio: float = 4.0
    tie_embeddings: bool = True
    attention_every: int = 0
    attention_heads: int | None = None
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    initializer_range: float = 0.02

    def resolved_mom(self) -> MoMConfig:
        """The mixer config with the model's hidden size filled in."""
        if self.mom.hidden_size is None:
            return dataclasses.replace(self.mom, hidden_size=self.hidden_size)
        return self.mom

    def validate(self) -> LMConfig:
        for key in ("vocab_size", "num_layers", "hidden_size"):
            val = getattr(self, key)
            _check(_is_int(val) and val >= 1, key, val, "must be a positive int")
        _check(self.mixer in MIXERS, "mixer", self.mixer, f"one of {', '.join(MIXERS)}")
        _check(self.mom.hidden_size in (None, self.hidden_size), "mom.hidden_size", self.mom.hidden_size,
               f"must be null (inherit) or equal hidden_size={self.hidden_size}")
        self.resolved_mom().validate(prefix="mom.")
        _check(_is_num(self.mlp_ratio) and self.mlp_ratio > 0, "mlp_ratio", self.mlp_ratio, "must be > 0")
        _check(_is_int(self.attention_every) and self.attention_every >= 0, "attention_every",
               self.attention_every, "must be an int >= 0 (0: no attention blocks)")
        heads = self.attention_heads if self.attention_heads is not None else self.mom.num_heads
        if self.mixer == "attention" or self.attention_every:
            _check(_is_int(heads) and heads >= 1 and self.hidden_size % heads == 0, "attention_heads", heads,
                   f"must divide hidden_size={self.hidden_size}")
            _check((self.hidden_size // heads) % 2 == 0, "attention_heads", heads,
                   "hidden_size / attention_heads must be even (rotary positions)")
        for key in ("rope_theta", "norm_eps", "initializer_range"):
            val = getattr(self, key)
            _check(_is_num(val) and val > 0, key, val, "must be > 0")
        _check(isinstance(self.tie_embeddings, bool), "tie_embeddings", self.tie_embeddings, "must be true or false")
        return self

    def mixer_of(self, layer: int) -> str:
        if self.attention_every and (layer + 1) % self.attention_every == 0:
            return "attention"
        return self.mixer
