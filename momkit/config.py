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
    # renormalized: the selected memories' scores divided by their sum (the MoM paper; no task gradient to
    # the router at top-1); unnormalized: each selected memory's own score (Switch Transformer)
    router_weights: str = "renormalized"
    router_noise_std: float = 0.0
    router_bias_update_rate: float = 1e-3
    short_conv: bool = True
    conv_size: int = 4
    capacity_factor: float | None = None
    single_kv_proj: bool = False
    aux_loss_scale: float = 1e-3
    z_loss_scale: float = 0.0
    layerwise_balance: bool = False
    # chunk length of the CPU path (the GPU kernels use their own); a memory sees about T * topk / M tokens
    # per sequence, and shorter chunks waste less padding on such segments (measured: benchmarks/cpu_layer.py)
    chunk_size: int = 32
    impl: str = "auto"
    norm_eps: float = 1e-6
    # The official MoM code's parameter sharing and init (fla's MomAttention; docs/mom.md, "Differences from the
    # official code"). Off by default: momkit gives each memory its own decay, convolutions and gate biases.
    share_decay: bool = False  # one A_log and dt_bias for all memories and the shared one (mamba2, gated_deltanet)
    share_kv_conv: bool = False  # one k and one v short convolution for all memories and the shared one
    beta_bias: bool = True  # the beta gate's projection has a bias (deltanet, gated_deltanet)
    shared_uses_routed_proj: bool = False  # with single_kv_proj: the shared memory uses the routed projections too
    init: str = "momkit"  # "fla": A ~ U(0, 16), every Linear xavier-uniform with gain 2^-2.5 and zero bias

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
        from momkit.routing import ROUTER_WEIGHTS, get_router

        if get_router(self.router).learned:
            _check(self.router_weights in ROUTER_WEIGHTS, f"{p}router_weights", self.router_weights,
                   f"one of {', '.join(ROUTER_WEIGHTS)}")
        else:
            _check(self.router_weights == "renormalized", f"{p}router_weights", self.router_weights,
                   f"router {self.router!r} is not learned (equal weights): only renormalized")
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
        for key in ("shared_memory", "short_conv", "single_kv_proj", "layerwise_balance", "share_decay",
                    "share_kv_conv", "beta_bias", "shared_uses_routed_proj"):
            _check(isinstance(getattr(self, key), bool), p + key, getattr(self, key), "must be true or false")
        _check(self.init in INITS, f"{p}init", self.init, f"one of {', '.join(INITS)}")
        self._validate_official(p)
        return self

    def _validate_official(self, p: str) -> None:
        """The official-code options need the parts they share or change."""
        import torch

        from momkit.rules import get_rule, rule_names
        from momkit.rules.gates import beta_gates, decay_parameters

        def probe(rule: str):  # a tiny gate module to inspect; its initialisation must not draw from
            with torch.random.fork_rng(devices=[]):  # the global generator, or validating a config would
                return get_rule(rule).gate_module(8, 1, 4)  # change every model built after it

        if self.share_decay:
            with_decay = [r for r in rule_names() if decay_parameters(probe(r))]
            _check(bool(decay_parameters(probe(self.rule))), f"{p}share_decay", True,
                   f"rule {self.rule!r} has no data-dependent decay (A_log, dt_bias); rules with one: "
                   f"{', '.join(with_decay)}")
        if not self.beta_bias:
            with_beta = [r for r in rule_names() if beta_gates(probe(r))]
            _check(bool(beta_gates(probe(self.rule))), f"{p}beta_bias", False,
                   f"rule {self.rule!r} has no beta gate; rules with one: {', '.join(with_beta)}")
        _check(not self.share_kv_conv or self.short_conv, f"{p}share_kv_conv", True,
               "needs short_conv=true (there is no convolution to share)")
        _check(not self.shared_uses_routed_proj or (self.single_kv_proj and self.shared_memory),
               f"{p}shared_uses_routed_proj", True, "needs single_kv_proj=true and shared_memory=true")


MIXERS = ("mom", "single", "attention")
INITS = ("momkit", "fla")


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


DATA_ORDERS = ("shuffled", "in_order")


@dataclass
class OptimConfig:
    """AdamW with linear warmup and cosine (or constant) decay; gradient clipping; the order of the training
    batches: ``shuffled`` (each epoch, examples permuted within each segment and the batches of all segments
    interleaved, seeded by ``(run.seed, epoch)``) or ``in_order`` (segment by segment, examples in generation
    order, the same every epoch: zoology's order)."""

    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 100
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    batch_size: int = 64
    max_steps: int = 1000
    data_order: str = "shuffled"

    def validate(self, prefix: str = "optim.") -> OptimConfig:
        p = prefix
        for key in ("lr", "eps"):
            _check(_is_num(getattr(self, key)) and getattr(self, key) > 0, p + key, getattr(self, key), "must be > 0")
        for key in ("weight_decay", "grad_clip"):
            _check(_is_num(getattr(self, key)) and getattr(self, key) >= 0, p + key, getattr(self, key),
                   "must be >= 0 (0 disables it)")
        _check(len(self.betas) == 2 and all(_is_num(b) and 0 <= b < 1 for b in self.betas), f"{p}betas",
               list(self.betas), "two numbers in [0, 1)")
        _check(_is_int(self.warmup_steps) and self.warmup_steps >= 0, f"{p}warmup_steps", self.warmup_steps,
               "must be an int >= 0")
        _check(self.schedule in ("cosine", "constant"), f"{p}schedule", self.schedule, "one of cosine, constant")
        _check(_is_num(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1, f"{p}min_lr_ratio", self.min_lr_ratio,
               "must be in [0, 1]")
        for key in ("batch_size", "max_steps"):
            _check(_is_int(getattr(self, key)) and getattr(self, key) >= 1, p + key, getattr(self, key),
                   "must be a positive int")
        _check(self.data_order in DATA_ORDERS, f"{p}data_order", self.data_order, f"one of {', '.join(DATA_ORDERS)}")
        return self


DEVICES = ("auto", "cpu", "cuda")


@dataclass
class RunConfig:
    """Where and how a run happens. ``dir`` defaults to ``runs/<name>``."""

    name: str = "run"
    dir: str | None = None
    seed: int = 0
    device: str = "auto"
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    eval_every: int = 100
    eval_batches: int | None = None  # None: the whole valid split
    eval_batch_size: int | None = None  # None: optim.batch_size
    log_every: int = 10
    checkpoint_every: int = 100
    target_accuracy: float | None = None  # early stop once valid accuracy reaches it
    best_metric: str = "valid/accuracy"  # which evaluation is "best" (best.pt, RunResult.best)
    best_mode: str = "max"  # max or min
    progress: bool = True
    threads: int | None = None  # CPU threads for torch (None: torch's default)
    dist_timeout_s: float = 1800.0  # under torchrun: seconds a rank waits for the others before the job fails

    def validate(self, prefix: str = "run.") -> RunConfig:
        p = prefix
        _check(isinstance(self.name, str) and self.name and "/" not in self.name, f"{p}name", self.name,
               "a non-empty name without '/'")
        _check(_is_int(self.seed) and self.seed >= 0, f"{p}seed", self.seed, "must be an int >= 0")
        _check(self.device in DEVICES or str(self.device).startswith("cuda:"), f"{p}device", self.device,
               "one of auto, cpu, cuda, cuda:N")
        for key in ("eval_every", "log_every", "checkpoint_every"):
            _check(_is_int(getattr(self, key)) and getattr(self, key) >= 1, p + key, getattr(self, key),
                   "must be a positive int")
        for key in ("eval_batches", "eval_batch_size", "threads"):
            val = getattr(self, key)
            _check(val is None or (_is_int(val) and val >= 1), p + key, val, "must be null or a positive int")
        _check(_is_num(self.dist_timeout_s) and self.dist_timeout_s > 0, f"{p}dist_timeout_s", self.dist_timeout_s,
               "must be a number > 0 (seconds)")
        _check(self.target_accuracy is None or (_is_num(self.target_accuracy) and 0 < self.target_accuracy <= 1),
               f"{p}target_accuracy", self.target_accuracy, "must be null or in (0, 1]")
        _check(isinstance(self.best_metric, str) and self.best_metric.startswith("valid/"), f"{p}best_metric",
               self.best_metric, "a valid/... metric name, e.g. valid/accuracy or valid/loss")
        _check(self.best_mode in ("max", "min"), f"{p}best_mode", self.best_mode, "one of max, min")
        return self


@dataclass
class TrainConfig:
    """Everything a training run needs: model, task (a mapping with ``name``, see momkit.tasks), optim, run."""

    model: LMConfig = field(default_factory=LMConfig)
    task: dict[str, Any] = field(default_factory=lambda: {"name": "mqar"})
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self, task: bool = True) -> TrainConfig:
        """Check every field; ``task=False`` skips the task (whose data files a trained model does not need)."""
        try:
            self.model.validate()
        except ConfigError as e:
            raise ConfigError(f"model.{e}") from None
        self.optim.validate()
        self.run.validate()
        if task:
            self.task_config()  # validates the task
        return self

    def task_config(self):
        from momkit.tasks import task_from_dict

        try:
            return task_from_dict(dict(self.task))
        except ConfigError as e:
            msg = str(e)
            if not msg.startswith("task"):
                msg = f"task: {msg}" if msg.startswith("unknown key") else f"task.{msg}"
            raise ConfigError(msg) from None

    @property
    def run_dir(self) -> str:
        return self.run.dir if self.run.dir is not None else f"runs/{self.run.name}"


# ------------------------------------------------------------------------------------ loading (OmegaConf)
def _packaged_configs() -> dict[str, Any]:
    from importlib import resources

    root = resources.files("momkit") / "configs"
    return {p.name[: -len(".yaml")]: p for p in root.iterdir() if p.name.endswith(".yaml")}


def config_names() -> list[str]:
    """Names of the configs packaged in momkit/configs/."""
    return sorted(_packaged_configs())


def _read_source(source: str):
    """A packaged config name or a YAML path -> (OmegaConf node, name)."""
    from pathlib import Path

    import yaml
    from omegaconf import OmegaConf

    packaged = _packaged_configs()
    if source in packaged:
        text, name = packaged[source].read_text(), source
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config {source!r} is neither a packaged config ({', '.join(sorted(packaged))}) "
                              "nor an existing YAML file")
        try:
            text, name = path.read_text(), path.stem
        except (OSError, UnicodeDecodeError) as e:
            why = e.strerror if isinstance(e, OSError) else "not a UTF-8 text file"
            raise ConfigError(f"config {source!r} cannot be read: {why}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config {source!r} is not valid YAML: {_yaml_problem(e)}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"config {source!r} is invalid: its top level must be a mapping of sections "
                          f"({', '.join(f.name for f in dataclasses.fields(TrainConfig))}), got "
                          f"{type(raw).__name__} {_short(raw)}")
    try:
        node = OmegaConf.create(text)
    except Exception as e:  # what OmegaConf refuses beyond plain YAML (duplicate keys)
        raise ConfigError(f"config {source!r} is invalid: {_yaml_problem(e)}") from None
    return node, name


def _yaml_problem(e: Exception) -> str:
    """One line for a YAML error: the problem and where it is."""
    problem, mark = getattr(e, "problem", None), getattr(e, "problem_mark", None)
    if problem:
        return problem + (f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else "")
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _short(value: Any, width: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _check_sections(tree: dict, cls: type | None = None, prefix: str = "") -> None:
    """Every section of the structure (model, model.mom, task, optim, run) must be given as a mapping."""
    cls = cls or TrainConfig
    for f in dataclasses.fields(cls):
        if f.name not in tree or tree[f.name] is None:
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        value = tree[f.name]
        if dataclasses.is_dataclass(default) or isinstance(default, dict):
            if not isinstance(value, dict):
                if dataclasses.is_dataclass(default):
                    what = f"a section with keys {', '.join(g.name for g in dataclasses.fields(default))}"
                else:
                    what = "with a 'name' key" if f.name == "task" else "of names to values"
                raise ConfigError(f"{prefix}{f.name}={_short(value)} is invalid: must be a mapping ({what})")
            if dataclasses.is_dataclass(default):
                _check_sections(value, type(default), f"{prefix}{f.name}.")


def _omegaconf_error(e: Exception, base) -> ConfigError:
    """Turn an OmegaConf error into one line naming the key, the value and what is allowed."""
    import difflib

    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import ConfigKeyError

    key = getattr(e, "full_key", None) or "?"
    if isinstance(e, ConfigKeyError):
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(base, parent) if parent else base
        valid = list(node.keys()) if isinstance(node, DictConfig) else []
        close = difflib.get_close_matches(leaf, [str(v) for v in valid], n=1)
        hint = f"; did you mean {(parent + '.' if parent else '') + close[0]!r}?" if close else ""
        return ConfigError(f"unknown key {key!r}{hint} (valid keys here: {', '.join(map(str, valid))})")
    first = str(e).splitlines()[0]
    return ConfigError(f"{key}: {first}")


def load_config(source: str | None = None, overrides: list[str] | tuple[str, ...] = (),
                validate_task: bool = True) -> TrainConfig:
    """A TrainConfig from a packaged config name or a YAML path, plus ``key=value`` dotted overrides.

    Unknown keys, wrong types and invalid values raise ConfigError (one line) before any work starts;
    ``validate_task=False`` leaves the task section unchecked (e.g. its data files may be elsewhere).
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    base = OmegaConf.structured(TrainConfig)
    layers = []
    if source is not None:
        node, name = _read_source(source)
        layers += [OmegaConf.create({"run": {"name": name}}), node]
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} must look like key=value (e.g. model.mom.num_memories=8)")
        try:
            layers.append(OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as e:
            raise ConfigError(f"override {item!r} could not be parsed: {str(e).splitlines()[0]}") from None
    for layer in layers:
        _check_sections(OmegaConf.to_container(layer))
    try:
        merged = OmegaConf.merge(base, *layers)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise _omegaconf_error(e, base) from None
    return cfg.validate(task=validate_task)


def config_to_yaml(cfg: TrainConfig) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
