"""momkit: a research kit for Mixture-of-Memories (MoM) linear sequence models.

Importing momkit is light: Triton kernels, Optuna, seaborn and the like are imported only when used.
"""

from __future__ import annotations

__version__ = "0.1.0"

from momkit.config import ConfigError, LMConfig, MoMConfig
from momkit.layers import MoMLayer, SingleMemoryLayer
from momkit.models import MoMLM
from momkit.rules import Rule, get_rule, register_rule, rule_names

__all__ = ["ConfigError", "LMConfig", "MoMConfig", "MoMLM", "MoMLayer", "Rule", "SingleMemoryLayer",
           "__version__", "get_rule", "register_rule", "rule_names"]
