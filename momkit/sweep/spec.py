"""Sweep specs: one YAML file names the experiment, ``load_spec(path) -> SweepSpec`` validates it.

    study: demo                          # default study name (else the file's stem)
    base: mqar_tiny                      # packaged config name or YAML path (relative to the spec file)
    overrides: {optim.max_steps: 150}    # fixed dotted overrides, the same for every trial
    space:                               # dotted config key -> what to try
      model.mom.num_memories: [1, 2, 4]  # a list is categorical
      optim.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
      model.num_layers: {type: int, low: 1, high: 4}
      router:                            # a bundle: a categorical choice among named override sets
        type: bundle
        values: {sparse: {model.mom.router: topk_softmax}, dense: {model.mom.router: dense, model.mom.topk: 4}}
    objective: {metric: valid/accuracy, direction: maximize, from: best}
    sampler: {name: grid, seed: 0}       # tpe | random | grid
    pruner: {name: median, startup_trials: 4, warmup_steps: 50}   # median | hyperband | none
    budget: {trials: 12, timeout: null}  # trials in the study; seconds per worker
    seeds: 1                             # n (run.seed = 0..n-1) or a list; the objective is the mean
    heartbeat: {interval: 20, grace_period: 60, max_retry: 2}
    runs_dir: runs/sweeps                # trial t, seed s runs in <runs_dir>/<study>/trial-<t>/seed-<s>

Everything is checked against the ``TrainConfig`` structure before any work starts: unknown spec keys,
bad ranges, config keys that do not exist, values of the wrong type, and values that are invalid in every
combination with the other parameters raise one ``ConfigError`` naming the key, the value and what is
allowed. Combinations are checked with ``TrainConfig.validate``; a grid runs only its valid combinations
(``topk > num_memories`` is left out, not failed).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import itertools
import json
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from momkit.config import ConfigError, TrainConfig, _yaml_problem, load_config
from momkit.sweep.verdicts import parse_claims

SPEC_KEYS = ("study", "description", "base", "overrides", "space", "objective", "sampler", "pruner", "budget",
             "seeds", "heartbeat", "runs_dir", "claims")
PARAM_TYPES = ("categorical", "int", "float", "bundle")
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "hyperband", "none")
DIRECTIONS = ("maximize", "minimize")
SOURCES = ("best", "final")
# metrics of an evaluation (momkit.train.evaluate), plus ``valid/accuracy/<segment>``, and RunResult fields
METRICS = ("valid/accuracy", "valid/loss", "valid/load_imbalance", "valid/router_entropy", "valid/dead_memories",
           "valid/dropped_fraction")
RESULT_FIELDS = ("steps", "elapsed_s")
# set by the runner for every trial: run.dir and run.name from runs_dir, run.seed from seeds
RESERVED_KEYS = ("run.name", "run.dir", "run.seed")
_STUDY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_MAX_COMBOS = 20_000  # combinations checked when validating a space (sampled beyond that)
_MAX_GRID = 100_000


def check_study_name(name: Any, key: str = "study") -> str:
    if not (isinstance(name, str) and _STUDY_NAME.match(name)):
        raise ConfigError(f"{key}={name!r} is invalid: a study name is letters, digits, '_', '.' and '-', "
                          "starting with a letter or digit (it names a folder)")
    return name


def override_item(key: str, value: Any) -> str:
    """``key=value`` for ``load_config``; the value written as JSON, which OmegaConf reads as YAML."""
    return f"{key}={json.dumps(value)}"


@dataclass
class Param:
    """One dimension of the search space. ``name`` is a dotted config key, or any name for a bundle."""

    name: str
    type: str
    values: list[Any] | None = None  # categorical values; bundle names
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    bundles: dict[str, dict[str, Any]] | None = None

    def assignments(self, value: Any) -> dict[str, Any]:
        """The config keys this parameter sets when it takes ``value``."""
        return dict(self.bundles[value]) if self.type == "bundle" else {self.name: value}

    def grid_values(self) -> list[Any]:
        if self.type in ("categorical", "bundle"):
            return list(self.values)
        if self.type == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        raise ValueError(f"a float range has no grid values ({self.name})")

    def probe_values(self) -> list[Any]:
        """Values checked at load time: every choice, or the ends of a range."""
        if self.type in ("categorical", "bundle"):
            return list(self.values)
        if self.type == "int":
            last = int(self.low) + (int(self.high) - int(self.low)) // int(self.step or 1) * int(self.step or 1)
            return sorted({int(self.low), last})
        return [float(self.low), float(self.high)]

    def suggest(self, trial) -> Any:
        """Ask an Optuna trial for this parameter's value."""
        if self.type in ("categorical", "bundle"):
            return trial.suggest_categorical(self.name, list(self.values))
        if self.type == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), step=self.step, log=self.log)

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None and v is not False and k != "name"}


@dataclass
class Objective:
    metric: str = "valid/accuracy"
    direction: str = "maximize"
    source: str = "best"  # "best": RunResult.best (the best evaluation by the objective); "final": the last

    def read(self, result) -> float:
        """The objective of one ``RunResult``."""
        if self.metric in RESULT_FIELDS:
            return float(getattr(result, self.metric))
        evaluation = result.best if self.source == "best" else result.final
        if self.metric not in evaluation:
            numeric = sorted(k for k, v in evaluation.items() if isinstance(v, (int, float)))
            raise ConfigError(f"objective.metric={self.metric!r} is not among this run's metrics "
                              f"({', '.join(numeric)})")
        return float(evaluation[self.metric])


@dataclass
class SamplerSpec:
    name: str = "tpe"
    seed: int = 0
    startup_trials: int = 10  # TPE: random trials before the model kicks in


@dataclass
class PrunerSpec:
    name: str = "none"
    startup_trials: int = 5  # median: trials that finish before any is pruned
    warmup_steps: int = 0  # median: no pruning before this training step
    interval_steps: int = 1
    min_resource: int = 1  # hyperband, in training steps
    max_resource: int | None = None  # hyperband; default: optim.max_steps of the base config
    reduction_factor: int = 3


@dataclass
class Budget:
    trials: int | None = None  # None: the whole grid (grid sampler only)
    timeout: float | None = None  # seconds per worker: no new trial starts after it


@dataclass
class Heartbeat:
    interval: int = 20  # seconds between a running trial's heartbeats (SQL storages)
    grace_period: int = 60  # a running trial without heartbeat for this long is failed and retried
    max_retry: int = 2  # how often one configuration is retried after its worker died


@dataclass
class SweepSpec:
    path: str
    study: str
    base: str
    overrides: dict[str, Any]
    space: dict[str, Param]
    objective: Objective
    sampler: SamplerSpec
    pruner: PrunerSpec
    budget: Budget
    seeds: list[int]
    heartbeat: Heartbeat
    runs_dir: str
    description: str = ""
    base_written: str = ""  # base as the spec writes it (the resolved path can differ between machines)
    claims: list[dict] = field(default_factory=list)  # a paper's claims to judge (momkit.sweep.verdicts)
    base_config: TrainConfig | None = field(default=None, repr=False)  # base + overrides, typed, not validated
    grid: list[dict[str, Any]] | None = field(default=None, repr=False)  # valid grid points (grid sampler)

    def fingerprint(self) -> dict:
        """What defines the experiment; a study resumes only under the same fingerprint."""
        return {"base": self.base_written or self.base, "overrides": self.overrides,
                "space": {k: p.to_dict() for k, p in self.space.items()},
                "objective": dataclasses.asdict(self.objective), "seeds": self.seeds}

    def trial_overrides(self, params: dict[str, Any]) -> list[str]:
        """Fixed overrides then the parameters' assignments, as ``key=value`` items."""
        items = [override_item(k, v) for k, v in self.overrides.items()]
        for name, value in params.items():
            items += [override_item(k, v) for k, v in self.space[name].assignments(value).items()]
        return items

    def run_dir(self, study: str, number: int, seed: int | None = None) -> str:
        trial_dir = f"{self.runs_dir}/{study}/trial-{number:04d}"
        return trial_dir if seed is None else f"{trial_dir}/seed-{seed}"

    def trial_config(self, study: str, number: int, params: dict[str, Any], seed: int,
                     threads: int | None = None) -> TrainConfig:
        """The validated config of trial ``number`` for ``seed`` (raises ConfigError for invalid combinations)."""
        items = self.trial_overrides(params)
        items += [override_item("run.name", f"{study}-t{number:04d}-s{seed}"),
                  override_item("run.dir", self.run_dir(study, number, seed)),
                  override_item("run.seed", seed), "run.progress=false"]
        if threads is not None and not self.sets("run.threads"):
            items.append(override_item("run.threads", threads))
        return load_config(self.base, items)

    def sets(self, key: str) -> bool:
        """Whether the spec sets config key ``key`` (in overrides or through a parameter)."""
        return key in self.overrides or any(key in p.assignments(v) for p in self.space.values()
                                            for v in (p.values if p.type == "bundle" else [None]))

    @property
    def is_grid(self) -> bool:
        return self.sampler.name == "grid"

    def n_trials(self, requested: int | None = None) -> int:
        """The study's trial budget: ``requested`` (--n-trials), else budget.trials, else the grid's size."""
        n = requested if requested is not None else self.budget.trials
        if self.is_grid:
            if n is not None and n > len(self.grid):
                raise ConfigError(f"budget.trials={n} is invalid: the grid has {len(self.grid)} valid points")
            return len(self.grid) if n is None else n
        return n


# ------------------------------------------------------------------------------------------------ loading
def _fail(spec: str, msg: str) -> ConfigError:
    return ConfigError(f"sweep spec {spec}: {msg}")


def _unknown_keys(given, allowed, where: str) -> str | None:
    unknown = [k for k in given if k not in allowed]
    if not unknown:
        return None
    key = unknown[0]
    close = difflib.get_close_matches(str(key), list(allowed), n=1)
    hint = f"; did you mean {where + close[0]!r}?" if close else ""
    return f"unknown key {where + str(key)!r}{hint} (valid keys{' of ' + where.rstrip('.') if where else ''}: " \
           f"{', '.join(allowed)})"


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _section(raw: dict, name: str, cls, spec: str, checks: dict, aliases: dict[str, str] | None = None) -> Any:
    """A dataclass section from ``raw[name]`` (a mapping); ``checks`` maps field -> (predicate, allowed);
    ``aliases`` maps a key as written in the spec to its field (``from`` -> ``source``)."""
    aliases = aliases or {}
    written = {v: k for k, v in aliases.items()}
    keys = [written.get(f.name, f.name) for f in dataclasses.fields(cls)]
    node = raw.get(name)
    if node is None:
        node = {}
    if not isinstance(node, dict):
        raise _fail(spec, f"{name}={node!r} is invalid: must be a mapping with keys {', '.join(keys)}")
    bad = _unknown_keys(node, keys, f"{name}.")
    if bad:
        raise _fail(spec, bad)
    obj = cls(**{aliases.get(k, k): v for k, v in node.items()})
    for key, (ok, allowed) in checks.items():
        val = getattr(obj, key)
        if not ok(val):
            raise _fail(spec, f"{name}.{written.get(key, key)}={val!r} is invalid: {allowed}")
    return obj


def _parse_param(spec: str, name: str, node) -> Param:
    where = f"space.{name}"
    if isinstance(node, list):
        node = {"type": "categorical", "values": node}
    if not isinstance(node, dict):
        raise _fail(spec, f"{where}={node!r} is invalid: give a list of values (categorical) or a mapping with "
                          f"'type' ({', '.join(PARAM_TYPES)})")
    kind = node.get("type", "categorical" if "values" in node else None)
    if kind not in PARAM_TYPES:
        raise _fail(spec, f"{where}.type={kind!r} is invalid: one of {', '.join(PARAM_TYPES)}")
    allowed = {"categorical": ("type", "values"), "bundle": ("type", "values"),
               "int": ("type", "low", "high", "step", "log"), "float": ("type", "low", "high", "step", "log")}[kind]
    bad = _unknown_keys(node, allowed, f"{where}.")
    if bad:
        raise _fail(spec, f"{bad} for type {kind}")
    if kind in ("categorical", "bundle"):
        values = node.get("values")
        if kind == "bundle":
            if not isinstance(values, dict) or not values:
                raise _fail(spec, f"{where}.values={values!r} is invalid: a bundle needs a non-empty mapping "
                                  "name -> {dotted key: value, ...}")
            for bname, bundle in values.items():
                if not isinstance(bname, str):
                    raise _fail(spec, f"{where}.values: bundle name {bname!r} is invalid: must be a string")
                if not isinstance(bundle, dict) or not bundle or not all(isinstance(k, str) for k in bundle):
                    raise _fail(spec, f"{where}.values.{bname}={bundle!r} is invalid: must be a non-empty mapping "
                                      "of dotted config keys to values")
            return Param(name, "bundle", values=list(values), bundles={k: dict(v) for k, v in values.items()})
        if not isinstance(values, list) or not values:
            raise _fail(spec, f"{where}.values={values!r} is invalid: must be a non-empty list")
        for v in values:
            if v is not None and not isinstance(v, (bool, int, float, str)):
                raise _fail(spec, f"{where}: value {v!r} is invalid: categorical values are numbers, strings, "
                                  "booleans or null (use type: bundle for lists and mappings)")
        if len({json.dumps(v) for v in values}) != len(values):
            raise _fail(spec, f"{where}.values={values!r} is invalid: values must be distinct")
        return Param(name, "categorical", values=list(values))
    low, high, step, log = node.get("low"), node.get("high"), node.get("step"), node.get("log", False)
    num = _is_int if kind == "int" else _is_num
    what = "an int" if kind == "int" else "a number"
    for key, val in (("low", low), ("high", high)):
        if not num(val):
            raise _fail(spec, f"{where}.{key}={val!r} is invalid: must be {what}")
    if not low < high:
        raise _fail(spec, f"{where}: low={low!r}, high={high!r} is not a range: low must be < high")
    if not isinstance(log, bool):
        raise _fail(spec, f"{where}.log={log!r} is invalid: must be true or false")
    if log and low <= 0:
        raise _fail(spec, f"{where}.low={low!r} is invalid: a log range needs low > 0")
    if step is not None:
        if not num(step) or step <= 0:
            raise _fail(spec, f"{where}.step={step!r} is invalid: must be {what} > 0")
        if log:
            raise _fail(spec, f"{where}: step={step!r} and log=true exclude each other")
    return Param(name, kind, low=low, high=high, step=step, log=log)


def _get(cfg: TrainConfig, key: str) -> Any:
    obj = cfg
    for part in key.split("."):
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    return obj


def _set(cfg: TrainConfig, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    obj = cfg
    for part in parents:
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    if isinstance(obj, dict):
        obj[leaf] = value
    else:
        setattr(obj, leaf, value)


class _Typer:
    """Typed config values (OmegaConf's conversion against the TrainConfig structure), without validation."""

    def __init__(self, cfg: TrainConfig):
        from omegaconf import OmegaConf

        self.node = OmegaConf.structured(cfg)

    def apply(self, items: list[str]) -> TrainConfig:
        from omegaconf import OmegaConf
        from omegaconf.errors import OmegaConfBaseException

        from momkit.config import _omegaconf_error

        try:
            layers = [OmegaConf.from_dotlist([item]) for item in items]
            return OmegaConf.to_object(OmegaConf.merge(self.node, *layers))
        except OmegaConfBaseException as e:
            raise _omegaconf_error(e, self.node) from None

    def value(self, key: str, value: Any) -> Any:
        return _get(self.apply([override_item(key, value)]), key)


def _resolve_base(spec_path: Path, base: str) -> str:
    """A packaged config name, or a path relative to the spec file (or to the working directory)."""
    from momkit.config import config_names

    if base in config_names():
        return base
    candidate = spec_path.parent / base
    if not Path(base).is_absolute() and candidate.is_file():
        return str(candidate)
    return base


def _yaml_loader():
    """YAML's safe loader, reading ``1e-3`` as a number as OmegaConf does (YAML 1.1 wants ``1.0e-3``)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                                 re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                                 list("-+0123456789"))
    return Loader


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a sweep spec; raises ConfigError (one line) on any problem."""
    import yaml

    path = Path(path)
    spec = str(path)
    if not path.is_file():
        raise ConfigError(f"sweep spec {spec!r} does not exist (a YAML file, e.g. sweeps/demo.yaml)")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) else "not a UTF-8 text file"
        raise ConfigError(f"sweep spec {spec!r} cannot be read: {why}") from None
    try:
        raw = yaml.load(text, Loader=_yaml_loader())  # a SafeLoader subclass
    except yaml.YAMLError as e:
        raise ConfigError(f"sweep spec {spec}: not valid YAML: {_yaml_problem(e)}") from None
    if not isinstance(raw, dict):
        raise _fail(spec, f"must be a mapping with keys {', '.join(SPEC_KEYS)}")
    bad = _unknown_keys(raw, SPEC_KEYS, "")
    if bad:
        raise _fail(spec, bad)

    study = raw.get("study", path.stem)
    try:
        check_study_name(study)
    except ConfigError as e:
        raise _fail(spec, str(e)) from None
    description = raw.get("description") or ""
    base = raw.get("base")
    if not isinstance(base, str) or not base:
        raise _fail(spec, f"base={base!r} is invalid: a packaged config name or a YAML path is required")
    base_written, base = base, _resolve_base(path, base)
    overrides = raw.get("overrides") or {}
    if not isinstance(overrides, dict) or not all(isinstance(k, str) for k in overrides):
        raise _fail(spec, f"overrides={overrides!r} is invalid: must be a mapping of dotted config keys to values")
    space_raw = raw.get("space")
    if not isinstance(space_raw, dict) or not space_raw:
        raise _fail(spec, f"space={space_raw!r} is invalid: a non-empty mapping of dotted config keys "
                          "(or bundle names) to values or distributions is required")
    space = {str(k): _parse_param(spec, str(k), v) for k, v in space_raw.items()}
    try:
        claims = parse_claims(raw.get("claims"), space)
    except ConfigError as e:
        raise _fail(spec, str(e)) from None

    objective = _section(raw, "objective", Objective, spec, {
        "metric": (lambda m: m in METRICS or m in RESULT_FIELDS or (isinstance(m, str) and
                                                                    m.startswith("valid/accuracy/")),
                   f"one of {', '.join(METRICS + RESULT_FIELDS)} or valid/accuracy/<segment>"),
        "direction": (lambda d: d in DIRECTIONS, f"one of {', '.join(DIRECTIONS)}"),
        "source": (lambda s: s in SOURCES, "best (the best evaluation by the objective) or final"),
    }, aliases={"from": "source"})
    sampler = _section(raw, "sampler", SamplerSpec, spec, {
        "name": (lambda n: n in SAMPLERS, f"one of {', '.join(SAMPLERS)}"),
        "seed": (lambda s: _is_int(s) and s >= 0, "an int >= 0"),
        "startup_trials": (lambda s: _is_int(s) and s >= 0, "an int >= 0"),
    })
    pruner = _section(raw, "pruner", PrunerSpec, spec, {
        "name": (lambda n: n in PRUNERS, f"one of {', '.join(PRUNERS)}"),
        "startup_trials": (lambda s: _is_int(s) and s >= 0, "an int >= 0"),
        "warmup_steps": (lambda s: _is_int(s) and s >= 0, "an int >= 0"),
        "interval_steps": (lambda s: _is_int(s) and s >= 1, "an int >= 1"),
        "min_resource": (lambda s: _is_int(s) and s >= 1, "an int >= 1 (training steps)"),
        "max_resource": (lambda s: s is None or (_is_int(s) and s >= 1), "null or an int >= 1 (training steps)"),
        "reduction_factor": (lambda s: _is_int(s) and s >= 2, "an int >= 2"),
    })
    budget = _section(raw, "budget", Budget, spec, {
        "trials": (lambda n: n is None or (_is_int(n) and n >= 1), "null (grid: all points) or an int >= 1"),
        "timeout": (lambda t: t is None or (_is_num(t) and t > 0), "null or seconds > 0"),
    })
    heartbeat = _section(raw, "heartbeat", Heartbeat, spec, {
        "interval": (lambda s: _is_int(s) and s >= 1, "an int >= 1 (seconds)"),
        "grace_period": (lambda s: _is_int(s) and s >= 1, "an int >= 1 (seconds)"),
        "max_retry": (lambda s: _is_int(s) and s >= 0, "an int >= 0"),
    })
    if heartbeat.grace_period <= heartbeat.interval:
        raise _fail(spec, f"heartbeat.grace_period={heartbeat.grace_period} is invalid: must exceed "
                          f"heartbeat.interval={heartbeat.interval}")
    seeds = raw.get("seeds", 1)
    if _is_int(seeds) and seeds >= 1:
        seeds = list(range(seeds))
    elif not (isinstance(seeds, list) and seeds and all(_is_int(s) and s >= 0 for s in seeds)
              and len(set(seeds)) == len(seeds)):
        raise _fail(spec, f"seeds={seeds!r} is invalid: a count n >= 1 (run.seed = 0..n-1) or a list of "
                          "distinct ints >= 0")
    runs_dir = raw.get("runs_dir", "runs/sweeps")
    if not isinstance(runs_dir, str) or not runs_dir:
        raise _fail(spec, f"runs_dir={runs_dir!r} is invalid: a directory path")

    # sampler, pruner, objective and budget fit together
    if sampler.name == "grid":
        for name, p in space.items():
            if p.type == "float":
                raise _fail(spec, f"space.{name}: a float range cannot be enumerated by the grid sampler; give a "
                                  "list of values (e.g. [1.0e-3, 3.0e-3, 1.0e-2]) or use sampler tpe or random")
    if sampler.name != "grid" and budget.trials is None:
        raise _fail(spec, f"budget.trials is required for sampler {sampler.name!r} (only a grid knows its size)")
    if pruner.name != "none" and not objective.metric.startswith("valid/"):
        raise _fail(spec, f"pruner.name={pruner.name!r} is invalid with objective.metric={objective.metric!r}: "
                          "pruning needs a metric reported at every evaluation (valid/...); use pruner: {name: none}")

    # keys the runner sets, or set twice
    keys_of = {name: sorted({k for v in (p.values or [None]) for k in p.assignments(v)}) if p.type == "bundle"
               else [name] for name, p in space.items()}
    all_keys = [*overrides] + [k for ks in keys_of.values() for k in ks]
    for key in all_keys:
        if key in RESERVED_KEYS:
            what = "seeds" if key == "run.seed" else "runs_dir"
            raise _fail(spec, f"{key} is set for every trial by the sweep; use the spec's {what!r} instead")
    for name, ks in keys_of.items():
        for key in ks:
            if key in overrides:
                raise _fail(spec, f"{key} is both in overrides and in space ({name}); keep one")
            others = [n for n, o in keys_of.items() if n != name and key in o]
            if others:
                raise _fail(spec, f"{key} is set by both space.{name} and space.{others[0]}; keep one")

    # the config structure: base + overrides, every value of every parameter, and their combinations
    try:
        base_cfg = load_config(base)
    except ConfigError as e:
        raise _fail(spec, f"base: {e}") from None
    typer = _Typer(base_cfg)
    try:
        fixed_cfg = typer.apply([override_item(k, v) for k, v in overrides.items()])
    except ConfigError as e:
        raise _fail(spec, f"overrides: {e}") from None
    typer = _Typer(fixed_cfg)
    typed: dict[str, dict[Any, dict[str, Any]]] = {}  # param -> value (as written) -> {key: typed value}
    for name, p in space.items():
        typed[name] = {}
        for v in p.grid_values() if sampler.name == "grid" else p.probe_values():
            try:
                typed[name][json.dumps(v)] = {k: typer.value(k, x) for k, x in p.assignments(v).items()}
            except ConfigError as e:
                raise _fail(spec, f"space.{name}: value {v!r}: {e}") from None

    result = SweepSpec(spec, study, base, dict(overrides), space, objective, sampler, pruner, budget, seeds,
                       heartbeat, runs_dir, description, base_written, claims=claims, base_config=fixed_cfg)
    if pruner.name == "hyperband" and pruner.max_resource is None:
        result.pruner.max_resource = fixed_cfg.optim.max_steps
    points = _valid_points(spec, fixed_cfg, space, typed, grid=sampler.name == "grid", seed=sampler.seed)
    if sampler.name == "grid":
        result.grid = points
        if budget.trials is not None:
            try:
                result.n_trials()  # budget.trials <= grid size
            except ConfigError as e:
                raise _fail(spec, str(e)) from None
    return result


def _valid_points(spec: str, cfg: TrainConfig, space: dict[str, Param], typed: dict, grid: bool,
                  seed: int) -> list[dict[str, Any]]:
    """Check every combination of the probed values with ``TrainConfig.validate``. Every value must be valid
    in at least one combination; returns the valid combinations (the grid, shuffled with ``seed``)."""
    names = list(space)
    choices = [[(json.loads(s), t) for s, t in typed[n].items()] for n in names]
    total = math.prod(len(c) for c in choices)
    if grid and total > _MAX_GRID:
        raise _fail(spec, f"the grid has {total} points (more than {_MAX_GRID}); use sampler tpe or random")
    if total <= _MAX_COMBOS or grid:
        combos = itertools.product(*choices)
    else:
        rng = random.Random(seed)
        combos = (tuple(rng.choice(c) for c in choices) for _ in range(_MAX_COMBOS))
    valid, seen, errors = [], set(), {}
    for combo in combos:
        trial_cfg = copy.deepcopy(cfg)
        for _, assignments in combo:
            for key, value in assignments.items():
                _set(trial_cfg, key, value)
        point = {n: v for n, (v, _) in zip(names, combo)}
        try:
            trial_cfg.validate()
        except ConfigError as e:
            for n, (v, _) in zip(names, combo):
                errors.setdefault((n, json.dumps(v)), str(e))
            continue
        valid.append(point)
        seen.update((n, json.dumps(v)) for n, v in point.items())
    for n in names:
        for s in typed[n]:
            if (n, s) not in seen:
                raise _fail(spec, f"space.{n}: value {json.loads(s)!r} is invalid in every combination with the "
                                  f"other parameters: {errors.get((n, s), 'no valid combination')}")
    if grid:
        random.Random(seed).shuffle(valid)
    return valid
