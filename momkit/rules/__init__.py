"""Update rules: a registry of linear recurrences on a matrix memory.

    from momkit.rules import get_rule, rule_names, register_rule, Rule
    rule = get_rule("gated_deltanet")
    o, S = rule.chunked(q, k, v, g=g, beta=beta, output_final_state=True)

Every module in this package that is not private (no leading underscore) is imported here and
registers its rule, so adding a rule is one new file. See docs/rules.md.
"""

from __future__ import annotations

import importlib
import pkgutil

from momkit.rules.base import GateSpec, Rule

_REGISTRY: dict[str, Rule] = {}
_NOT_RULES = {"base", "gates"}


def register_rule(rule: Rule) -> Rule:
    """Add a rule instance to the registry (its ``name`` must be new)."""
    if not isinstance(rule, Rule):
        raise TypeError(f"register_rule expects a Rule instance, got {type(rule).__name__}")
    if rule.name in _REGISTRY and type(_REGISTRY[rule.name]) is not type(rule):
        raise ValueError(f"a rule named {rule.name!r} is already registered")
    _REGISTRY[rule.name] = rule
    return rule


def get_rule(name: str) -> Rule:
    """The registered rule called ``name``; unknown names raise ValueError listing valid ones."""
    if isinstance(name, Rule):
        return name
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown rule {name!r}; valid rules: {', '.join(rule_names())}") from None


def rule_names() -> list[str]:
    return sorted(_REGISTRY)


for _mod in pkgutil.iter_modules(__path__):
    if not _mod.name.startswith("_") and _mod.name not in _NOT_RULES:
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["GateSpec", "Rule", "get_rule", "register_rule", "rule_names"]
