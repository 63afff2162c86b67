"""momkit: a research kit for Mixture-of-Memories (MoM) linear sequence models.

Importing momkit is light: Triton kernels, Optuna, seaborn and the like are imported only when used.
"""

from __future__ import annotations

__version__ = "0.1.0"

from momkit.rules import Rule, get_rule, register_rule, rule_names

__all__ = ["Rule", "__version__", "get_rule", "register_rule", "rule_names"]
