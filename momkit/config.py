"""Configuration: dataclass configs, their validation, and ConfigError.

Every invalid value raises ``ConfigError`` (a ``ValueError``) naming the key, the bad value and what
is allowed, before any work starts.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """An invalid configuration value: the message names the key, the value and what is allowed."""
