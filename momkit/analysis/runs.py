"""Reading training runs: metrics.jsonl events, time series, load per memory over training, and
``train_or_load`` (train a config once, reuse the run directory afterwards; notebooks use it).

The event format is in docs/training.md: train events every ``log_every`` steps, valid events every
``eval_every`` steps with ``valid/load`` ``[layers, memories]``, and an ``end`` event.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

PathLike = str | os.PathLike


def read_metrics(run: PathLike | list[dict]) -> list[dict]:
    """All events of a run directory's (or a metrics.jsonl file's) log; a list of events passes through."""
    if isinstance(run, list):
        return run
    path = Path(run)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics log at {path} (expected a run directory or a metrics.jsonl file)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def metric_series(run: PathLike | list[dict], key: str, split: str = "valid") -> tuple[np.ndarray, np.ndarray]:
    """``(steps, values)`` of one metric over training, from the events of ``split`` that carry it."""
    events = [e for e in read_metrics(run) if e.get("split") == split and key in e]
    steps = np.array([e["step"] for e in events], dtype=np.int64)
    values = np.array([e[key] if e[key] is not None else math.nan for e in events], dtype=np.float64)
    return steps, values


def load_history(run: PathLike | list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """``(steps [S], load [S, layers, memories])``: the valid-set load per memory at every evaluation."""
    steps, loads = [], []
    for e in read_metrics(run):
        if e.get("split") == "valid" and "valid/load" in e:
            steps.append(e["step"])
            loads.append(e["valid/load"])
    if not loads:
        raise ValueError("the run logged no valid/load (not a MoM model, or no evaluation yet)")
    return np.array(steps, dtype=np.int64), np.array(loads, dtype=np.float64)


def load_entropy(load: np.ndarray) -> np.ndarray:
    """Entropy (nats) of load distributions over the last axis: ``log M`` when balanced, 0 when one
    memory takes every slot."""
    p = np.clip(np.asarray(load, dtype=np.float64), 0.0, None)
    p = p / p.sum(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log(p), 0.0)
    return terms.sum(-1)


def run_is_complete(run_dir: PathLike) -> bool:
    """Whether a run directory holds a finished run: config, checkpoint and an ``end`` event."""
    run_dir = Path(run_dir)
    if not ((run_dir / "config.yaml").is_file() and (run_dir / "last.pt").is_file()):
        return False
    try:
        return any(e.get("event") == "end" for e in read_metrics(run_dir))
    except (FileNotFoundError, json.JSONDecodeError):
        return False


# run settings that change how a run executes, not what it computes: a finished run differing only in
# these is the same run
EXECUTION_KEYS = ("threads", "progress")


def _what_is_trained(yaml_text: str) -> dict:
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.create(yaml_text))
    for key in EXECUTION_KEYS:
        cfg.get("run", {}).pop(key, None)
    return cfg


def train_or_load(cfg, reuse: bool = True, checkpoint: str = "last"):
    """Train ``cfg`` (a ``TrainConfig``) unless its run directory already holds a finished run of the
    same resolved config (execution settings ``run.threads`` and ``run.progress`` aside); returns
    ``(model, events)``. ``reuse=False`` always trains (over the directory). A directory with a
    different config is trained over, never silently reused."""
    from momkit.config import config_to_yaml
    from momkit.train import load_run, train

    run_dir = Path(cfg.run_dir)
    if reuse and run_is_complete(run_dir) and (
            _what_is_trained((run_dir / "config.yaml").read_text()) == _what_is_trained(config_to_yaml(cfg))):
        _, model = load_run(run_dir, checkpoint)
        return model, read_metrics(run_dir)
    result = train(cfg, overwrite=True)
    _, model = load_run(result.run_dir, checkpoint)
    return model, read_metrics(result.run_dir)
