"""Task registry: ``TASKS`` maps a task name to its config class, so a YAML config can say
``task: {name: mqar, vocab_size: 8192, ...}`` and ``task_from_dict`` turns that into the typed config.

Every config class has a ``name`` field equal to its registry key, so ``task_to_dict(cfg)`` round-trips
through ``task_from_dict``.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping

from momkit.config import ConfigError
from momkit.tasks.base import TaskData, _dataclass_from_mapping
from momkit.tasks.mqar import MQARConfig
from momkit.tasks.needle import NeedleConfig
from momkit.tasks.selective_copying import SelectiveCopyingConfig
from momkit.tasks.text import TextLMConfig

TaskConfig = MQARConfig | SelectiveCopyingConfig | NeedleConfig | TextLMConfig

TASKS: dict[str, type] = {
    "mqar": MQARConfig,
    "selective_copying": SelectiveCopyingConfig,
    "needle": NeedleConfig,
    "text": TextLMConfig,
}


def task_names() -> list[str]:
    return sorted(TASKS)


def task_from_dict(d: Mapping) -> TaskConfig:
    """The typed task config for ``d`` (a dict or an OmegaConf DictConfig) selected by ``d["name"]``."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"task must be a mapping with a 'name' key (one of {task_names()}), got {d!r}")
    if "name" not in d:
        raise ConfigError(f"task.name is required: one of {task_names()}")
    name = d["name"]
    if name not in TASKS:
        close = difflib.get_close_matches(str(name), TASKS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"task.name={name!r} is not a known task{hint} (known tasks: {', '.join(task_names())})")
    return _dataclass_from_mapping(TASKS[name], d)


def task_to_dict(cfg: TaskConfig) -> dict:
    """A plain dict of ``cfg`` (nested segments included) that ``task_from_dict`` turns back into ``cfg``."""
    if type(cfg) not in TASKS.values():
        raise TypeError(f"task_to_dict expects one of {[c.__name__ for c in TASKS.values()]}, got {type(cfg).__name__}")
    return dataclasses.asdict(cfg)


def build_task(task: TaskConfig | Mapping) -> TaskData:
    """Build a task from its typed config or from a mapping as accepted by ``task_from_dict``."""
    cfg = task_from_dict(task) if isinstance(task, Mapping) else task
    if type(cfg) not in TASKS.values():
        raise TypeError(f"build_task expects a task config or a mapping, got {type(task).__name__}")
    return cfg.build()
