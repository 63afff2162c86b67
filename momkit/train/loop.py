"""The training loop: ``train(cfg) -> RunResult``.

A run directory holds ``config.yaml`` (the resolved config), ``metrics.jsonl`` (one JSON object per
log / eval event), ``last.pt`` (model, optimizer, schedule, RNG states and data position, written
atomically) and ``best.pt`` (model weights at the best validation accuracy). ``resume=True``
continues from ``last.pt`` exactly: on CPU an interrupted and resumed run logs the same metrics as an
uninterrupted one. Ctrl-C (SIGINT) lets the step under way finish and writes ``last.pt`` before the
KeyboardInterrupt goes on, so a resumed run loses no steps (``StopAtStepEnd``). A non-finite loss or
gradient stops the run with an error naming the step and the quantity; the last good checkpoint is never
overwritten.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from momkit.config import ConfigError, TrainConfig, config_to_yaml
from momkit.models import MoMLM
from momkit.tasks import SupervisedMetrics, TaskData
from momkit.train.distributed import DataParallel, data_parallel, reduce_router_loads
from momkit.train.optim import make_optimizer

Metrics = dict[str, float]


class NonFiniteError(RuntimeError):
    """Training produced a NaN or Inf; the message names the step and the first non-finite quantity."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``train``, raised once the step under way ended and its checkpoint was written; the
    message says where the run stopped and how to go on. A KeyboardInterrupt, so ``except KeyboardInterrupt``
    catches it."""


class StopAtStepEnd:
    """Between ``install()`` and ``restore()``: a SIGINT (Ctrl-C, a notebook's interrupt, a sweep job's time
    limit) is held until the training step under way ends (``requested``); the loop then writes its
    checkpoint and raises ``TrainingInterrupted``. A second SIGINT a second or more after the first raises at
    once, for a step that does not end. (One Ctrl-C can reach a process twice within milliseconds: from its
    process group and from a parent passing it on.) Installed only in the main thread over Python's own
    handler, and not under torchrun, where the ranks would stop at different steps; elsewhere SIGINT raises
    KeyboardInterrupt at once."""

    def __init__(self, enabled: bool = True):
        self.at: float | None = None
        self._old = None
        self._enabled = enabled

    @property
    def requested(self) -> bool:
        return self.at is not None

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.at is None:
            self.at = now
        elif now - self.at >= 1.0:
            raise KeyboardInterrupt

    def install(self) -> None:
        if (self._enabled and threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            self._old = signal.signal(signal.SIGINT, self._handle)

    def restore(self) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
            self._old = None


@dataclass
class RunResult:
    run_dir: str
    steps: int
    stopped: str  # "max_steps" | "target_accuracy"
    final: Metrics  # the last evaluation
    best: Metrics  # the best evaluation by run.best_metric / run.best_mode
    elapsed_s: float
    history: list[dict] = field(default_factory=list)  # all metrics.jsonl events of this run


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"run.device={name!r} is invalid: CUDA is not available on this machine")
    return torch.device(name)


def device_lost(device: torch.device) -> str | None:
    """Why a CUDA ``device`` no longer works in this process, or None (it works, or it is not a CUDA device).
    Some CUDA errors (an illegal memory access, a device-side assert) are sticky: every later call on the
    device fails, whatever it is, so a one-element add tells."""
    if device.type != "cuda":
        return None
    try:
        torch.ones(1, device=device).add_(1).item()
        return None
    except Exception as e:  # any failure of a one-element add: the context is gone
        return f"{type(e).__name__}: {e}".splitlines()[0]


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    # the generators take their states as CPU byte tensors; a checkpoint read onto a GPU holds them there
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def routing_summary(routing: list) -> Metrics:
    """Mean over MoM layers of the routing telemetry (load imbalance = max - min load)."""
    stats = [r for r in routing if r is not None]
    if not stats:
        return {}
    n = len(stats)
    return {
        "load_imbalance": sum(s.max_load - s.min_load for s in stats) / n,
        "router_entropy": sum(s.entropy for s in stats) / n,
        "dead_memories": float(sum(s.dead_memories for s in stats)),
        "dropped_fraction": sum(s.dropped_fraction for s in stats) / n,
    }


@torch.no_grad()
def evaluate(model: MoMLM, data: TaskData, batch_size: int, device: torch.device, max_batches: int | None = None,
             amp: bool = False) -> Metrics:
    """Loss and accuracy on the valid split (overall and per segment), plus routing telemetry."""
    was_training = model.training
    model.eval()
    total, per_segment = SupervisedMetrics(), {}
    loads: list[list[list[float]]] = []
    routing_rows = []
    for i, batch in enumerate(data.batches("valid", batch_size)):
        if max_batches is not None and i >= max_batches:
            break
        inputs, labels = batch.inputs.to(device), batch.labels.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
            out = model(inputs)
        total.update(out.logits, labels)
        name = data.valid[batch.segment].name
        per_segment.setdefault(name, SupervisedMetrics()).update(out.logits, labels)
        routing_rows.append(routing_summary(out.routing))
        loads.append([r.load for r in out.routing if r is not None])
    model.train(was_training)
    result = {f"valid/{k}": v for k, v in total.compute().items()}
    if len(per_segment) > 1:
        for name, m in per_segment.items():
            result[f"valid/accuracy/{name}"] = m.compute()["accuracy"]
    if routing_rows and routing_rows[0]:
        for key in routing_rows[0]:
            result[f"valid/{key}"] = float(np.mean([r[key] for r in routing_rows]))
        result["valid/load"] = np.mean(np.array(loads), 0).round(4).tolist()  # [layers, memories]
    return result


def _run_dir_key(cfg: TrainConfig) -> str:
    """How the config names the run directory, for messages: ``run.dir='x'`` or ``run.name='x'``."""
    return f"run.dir={cfg.run.dir!r}" if cfg.run.dir is not None else f"run.name={cfg.run.name!r}"


def _check_run_dir(cfg: TrainConfig, resume: bool, overwrite: bool) -> Path:
    """The run directory, checked against ``resume`` / ``overwrite`` without changing anything."""
    run_dir = Path(cfg.run_dir)
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"{_run_dir_key(cfg)} is invalid: {run_dir} is a file, not a directory")
    exists = run_dir.is_dir() and any(run_dir.iterdir())
    if resume:
        if not (run_dir / "last.pt").is_file():
            raise ConfigError(f"cannot resume: {run_dir} has no checkpoint (last.pt)")
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"cannot resume: {run_dir} has no config.yaml (not a run directory)")
        return run_dir
    if exists and not overwrite:
        raise ConfigError(f"run directory {run_dir} already exists: continue it with --resume (resume=True) or "
                          f"start over with --overwrite (overwrite=True), or set run.name / run.dir")
    return run_dir


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and not prefix.startswith("task"):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _check_resume_config(cfg: TrainConfig, run_dir: Path) -> None:
    """A resumed run must train the same model on the same task the same way (max_steps may grow)."""
    from momkit.config import load_config

    saved = load_config(str(run_dir / "config.yaml"))
    a = _flat({sec: dataclasses.asdict(saved)[sec] for sec in ("model", "task", "optim")})
    b = _flat({sec: dataclasses.asdict(cfg)[sec] for sec in ("model", "task", "optim")})
    a.pop("optim.max_steps"), b.pop("optim.max_steps")
    diff = [f"{k} ({a.get(k)!r} -> {b.get(k)!r})" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if diff:
        raise ConfigError(f"cannot resume {run_dir} with a different config: {', '.join(diff)}; a resumed run keeps "
                          "its model, task and optimizer (only optim.max_steps and run.* may change)")


def _read_checkpoint(path: Path, device: torch.device) -> dict:
    """``last.pt``, or one ConfigError naming the file (which is left as it is)."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
        missing = [k for k in ("model", "optim", "sched", "state", "rng") if k not in ckpt]
    except Exception as e:  # truncated, corrupt, or not a checkpoint at all
        first = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"cannot resume: {path} cannot be read ({first}); it is left as it is: restore it, or "
                          "start over with --overwrite (overwrite=True)") from None
    if missing:
        raise ConfigError(f"cannot resume: {path} is not a momkit checkpoint (no {', '.join(missing)}); it is left "
                          "as it is")
    return ckpt


def _check_not_complete(cfg: TrainConfig, run_dir: Path, state: dict) -> None:
    """Resuming a finished run is refused, with how to extend it."""
    step = state["step"]
    if step >= cfg.optim.max_steps:
        raise ConfigError(f"cannot resume {run_dir}: the run is complete ({step} steps of optim.max_steps="
                          f"{cfg.optim.max_steps}); to train it further pass a larger optim.max_steps, e.g. "
                          f"optim.max_steps={2 * step}")
    target, reached = cfg.run.target_accuracy, state["final"].get("valid/accuracy")
    if target is not None and reached is not None and reached >= target:  # the loop stopped at that evaluation
        raise ConfigError(f"cannot resume {run_dir}: the run is complete (at step {step} valid/accuracy={reached:.4f} "
                          f"reached run.target_accuracy={target}); to train it further raise run.target_accuracy "
                          "or set run.target_accuracy=null")


def _read_metrics(path: Path, upto: int) -> list[str]:
    """The lines of ``metrics.jsonl`` up to step ``upto`` (later events are produced again)."""
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise ConfigError(f"cannot resume: {path} cannot be read ({e.strerror})") from None
    kept = []
    for i, line in enumerate(lines, 1):
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"cannot resume: {path} line {i} is not a metrics event: {line[:60]!r}") from None
        if step <= upto:
            kept.append(line)
    return kept


def _make_run_dir(cfg: TrainConfig, run_dir: Path, overwrite: bool) -> None:
    """Start writing: (with ``overwrite``) delete the old run, create the directory."""
    if overwrite and run_dir.is_dir() and any(run_dir.iterdir()):
        shutil.rmtree(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{_run_dir_key(cfg)} is invalid: the run directory {run_dir} cannot be created "
                          f"({e.strerror})") from None


def _check_impl(cfg: TrainConfig, device: torch.device) -> None:
    """An explicit ``model.mom.impl='triton'`` must be able to run here (the layers never fall back)."""
    from momkit.rules import get_rule

    mom = cfg.model.mom
    uses_rule = cfg.model.mixer != "attention" or any(cfg.model.mixer_of(i) != "attention"
                                                      for i in range(cfg.model.num_layers))
    if mom.impl == "triton" and uses_rule:
        reason = get_rule(mom.rule).triton_unavailable_reason(torch.zeros(1, device=device))
        if reason is not None:
            raise ConfigError(f"model.mom.impl='triton' is invalid on this machine (run.device={cfg.run.device!r}): "
                              f"{reason}; use auto (Triton where it can run) or chunked")


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False,
          callback: Callable[[int, Metrics], None] | None = None) -> RunResult:
    """Train ``cfg.model`` on ``cfg.task``. ``callback(step, metrics)`` is called after every evaluation
    (sweeps report to their pruner there; an exception from it stops the run).

    Under ``torchrun`` every rank calls this: they train one model with DistributedDataParallel, each on
    its shard of every global batch; rank 0 alone evaluates (the others receive its metrics), writes the
    run directory and calls ``callback``. See momkit/train/distributed.py."""
    cfg.validate()
    dp = data_parallel(cfg.run.device, cfg.optim.batch_size, cfg.run.dist_timeout_s)
    try:
        return _train(cfg, resume, overwrite, callback, dp)
    finally:
        if dp is not None:
            dp.close()


def _train(cfg: TrainConfig, resume: bool, overwrite: bool, callback: Callable[[int, Metrics], None] | None,
           dp: DataParallel | None) -> RunResult:
    main = dp is None or dp.is_main  # the process that writes the run directory
    device = dp.device if dp is not None else resolve_device(cfg.run.device)
    _check_impl(cfg, device)
    run_dir = _check_run_dir(cfg, resume, overwrite)
    metrics_path = run_dir / "metrics.jsonl"
    ckpt, kept = None, []
    if resume:  # everything is checked before anything in the run directory changes
        _check_resume_config(cfg, run_dir)
        ckpt = _read_checkpoint(run_dir / "last.pt", device)
        _check_not_complete(cfg, run_dir, ckpt["state"])
        kept = _read_metrics(metrics_path, ckpt["state"]["step"])
    data = cfg.task_config().build()
    if cfg.model.vocab_size < data.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is invalid: the task needs at least "
                          f"{data.vocab_size} (task.vocab_size)")
    if cfg.run.threads is not None:
        torch.set_num_threads(cfg.run.threads)

    _seed_all(cfg.run.seed)
    model = MoMLM(cfg.model).to(device).train()
    opt, sched = make_optimizer(model, cfg.optim)
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best": {}, "final": {},
             "accum": {"n": 0, "loss": 0.0, "ce": 0.0, "aux": 0.0, "correct": 0.0, "supervised": 0.0}}
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optim"])
            sched.load_state_dict(ckpt["sched"])
        except (RuntimeError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[0]
            raise ConfigError(f"cannot resume: {run_dir / 'last.pt'} does not fit the model of config.yaml ({first}); "
                              "it is left as it is") from None
        state = ckpt["state"]
        _set_rng_state(ckpt["rng"])

    if dp is not None:  # every rank checked the run directory before rank 0 changes it
        dp.barrier()
    # every check passed: from here on the run directory is written
    if main:
        _make_run_dir(cfg, run_dir, overwrite)
        (run_dir / "config.yaml").write_text(config_to_yaml(cfg))
        # on resume, events logged after the checkpoint are dropped: they will be produced again
        metrics_path.write_text("".join(ln + "\n" for ln in kept))
    net, forward_kw = model, {}
    if dp is not None:
        from torch.nn.parallel import DistributedDataParallel

        # a memory that no token of this rank's shard is routed to takes no part in its backward pass
        uses_mom = any(block.kind == "mom" for block in model.blocks)
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      find_unused_parameters=uses_mom)
        forward_kw = {"global_sum": dp.global_sum}

    amp = cfg.run.amp and device.type == "cuda"
    eval_bs = cfg.run.eval_batch_size or cfg.optim.batch_size
    history: list[dict] = [json.loads(ln) for ln in kept]
    t_start = time.perf_counter() - state.get("elapsed_s", 0.0)

    def log(event: dict) -> None:
        event = {"step": state["step"], **event, "elapsed_s": round(time.perf_counter() - t_start, 3)}
        history.append(event)
        if main:
            with metrics_path.open("a") as f:
                f.write(json.dumps(event) + "\n")

    def checkpoint() -> None:
        state["elapsed_s"] = time.perf_counter() - t_start
        if not main:
            return
        _atomic_save({"model": model.state_dict(), "optim": opt.state_dict(), "sched": sched.state_dict(),
                      "state": state, "rng": _rng_state()}, run_dir / "last.pt")

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.optim.max_steps, initial=state["step"], disable=not (cfg.run.progress and main),
               desc=cfg.run.name, dynamic_ncols=True)
    # the postfix: the latest training means, and the latest evaluation's run.best_metric
    postfix: dict[str, str] = {}
    valid_label = "val_" + cfg.run.best_metric.removeprefix("valid/").replace("/", "_")
    if state["final"].get(cfg.run.best_metric) is not None:
        postfix[valid_label] = f"{state['final'][cfg.run.best_metric]:.4f}"
    stopped = "max_steps"
    acc = state["accum"]
    window = {"t": time.perf_counter(), "tokens": 0}  # input tokens since the last train log
    interrupt = StopAtStepEnd(enabled=dp is None)
    try:
        interrupt.install()
        while state["step"] < cfg.optim.max_steps and stopped == "max_steps":
            batches = data.batches("train", cfg.optim.batch_size, shuffle=cfg.optim.data_order == "shuffled",
                                   seed=cfg.run.seed, epoch=state["epoch"], start=state["batch_in_epoch"])
            for batch in batches:
                inputs, labels = batch.inputs, batch.labels
                if dp is not None:  # this rank's shard of the global batch
                    inputs, labels = dp.shard(inputs), dp.shard(labels)
                inputs, labels = inputs.to(device), labels.to(device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    out = net(inputs, labels=labels, **forward_kw)
                step = state["step"] + 1
                opt.zero_grad(set_to_none=True)
                out.loss.backward()
                grads = [p.grad for p in model.parameters() if p.grad is not None]
                if cfg.optim.grad_clip > 0:  # the norm before clipping
                    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                else:
                    grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=device)
                with torch.no_grad():
                    sup = labels != -100
                    correct = ((out.logits.argmax(-1) == labels) & sup).sum()
                    # one wait for the device per step: the checks and the logged numbers together
                    numbers = torch.stack([
                        out.loss.detach().float(), out.ce_loss.detach().float(), out.aux_loss.detach().float(),
                        grad_norm.detach().float(), correct.float(), sup.sum().float()])
                    if dp is not None:  # the counts are per rank (losses and norm are global already)
                        dp.sum_(numbers[4:])
                    loss, ce, aux, norm, n_correct, n_sup = numbers.tolist()
                for name, val in (("loss", loss), ("cross-entropy", ce), ("aux_loss", aux)):
                    if not math.isfinite(val):
                        raise NonFiniteError(f"step {step}: {name} is {val} (training stopped; "
                                             f"the last good checkpoint is {run_dir / 'last.pt'})")
                if not math.isfinite(norm):
                    bad = next(n for n, p in model.named_parameters()
                               if p.grad is not None and not torch.isfinite(p.grad).all())
                    raise NonFiniteError(f"step {step}: the gradient of {bad} is not finite (training "
                                         f"stopped; the last good checkpoint is {run_dir / 'last.pt'})")
                opt.step()
                sched.step()
                if dp is not None:
                    reduce_router_loads(model, dp)
                model.update_routing_biases()
                state["step"], state["batch_in_epoch"] = step, state["batch_in_epoch"] + 1
                acc["n"] += 1
                acc["loss"] += loss
                acc["ce"] += ce
                acc["aux"] += aux
                acc["correct"] += n_correct
                acc["supervised"] += n_sup
                window["tokens"] += batch.inputs.numel()
                if step % cfg.run.log_every == 0:
                    acc.update({f"r/{k}": v for k, v in routing_summary(out.routing).items()})  # this step's
                    n = acc["n"]
                    event = {"split": "train", "loss": acc["loss"] / n, "ce_loss": acc["ce"] / n,
                             "aux_loss": acc["aux"] / n, "accuracy": acc["correct"] / max(acc["supervised"], 1),
                             "lr": sched.get_last_lr()[0],
                             **{k[2:]: v for k, v in acc.items() if k.startswith("r/")}}
                    now = time.perf_counter()  # throughput since the last log (evaluation and checkpoints included)
                    event["tokens_per_s"] = window["tokens"] / max(now - window["t"], 1e-9)
                    window.update(t=now, tokens=0)
                    if device.type == "cuda":
                        event["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
                    log(event)
                    postfix.update(loss=f"{event['loss']:.3f}", acc=f"{event['accuracy']:.3f}",
                                   aux=f"{event['aux_loss']:.3g}", bal=f"{event.get('load_imbalance', 0):.2f}")
                    bar.set_postfix(postfix, refresh=False)
                    acc.clear()
                    acc.update({"n": 0, "loss": 0.0, "ce": 0.0, "aux": 0.0, "correct": 0.0, "supervised": 0.0})
                bar.update(1)
                last = step >= cfg.optim.max_steps
                if step % cfg.run.eval_every == 0 or last:
                    metrics = evaluate(model, data, eval_bs, device, cfg.run.eval_batches, amp) if main else {}
                    if dp is not None:
                        metrics = dp.broadcast(metrics)
                    log({"split": "valid", **metrics})
                    state["final"] = metrics
                    if isinstance(metrics.get(cfg.run.best_metric), (int, float)):
                        postfix[valid_label] = f"{metrics[cfg.run.best_metric]:.4f}"
                        bar.set_postfix(postfix, refresh=False)
                    if _better(metrics, state["best"], cfg.run.best_metric, cfg.run.best_mode):
                        state["best"] = {"step": step, **metrics}
                        if main:
                            _atomic_save({"model": model.state_dict(), "step": step}, run_dir / "best.pt")
                    if callback is not None and main:
                        callback(step, metrics)
                    target = cfg.run.target_accuracy
                    if target is not None and metrics.get("valid/accuracy", 0) >= target:
                        stopped = "target_accuracy"
                cut = interrupt.requested and not last and stopped == "max_steps"
                if step % cfg.run.checkpoint_every == 0 or last or stopped != "max_steps" or cut:
                    checkpoint()
                if cut:
                    raise TrainingInterrupted(
                        f"training stopped at step {step} of {cfg.optim.max_steps}; its checkpoint "
                        f"{run_dir / 'last.pt'} goes on with resume=True (momkit train ... --resume)")
                if last or stopped != "max_steps":
                    break
            else:  # the epoch ran out
                state["epoch"], state["batch_in_epoch"] = state["epoch"] + 1, 0
    except NonFiniteError as e:
        log({"event": "nonfinite", "message": str(e)})
        raise
    finally:
        interrupt.restore()
        if stopped != "max_steps":  # an early stop: the bar ends full, at the step where training stopped
            bar.total = state["step"]
        bar.set_postfix(postfix, refresh=False)
        bar.close()
    elapsed = time.perf_counter() - t_start
    log({"event": "end", "stopped": stopped})
    return RunResult(str(run_dir), state["step"], stopped, state["final"], state["best"], elapsed, history)


def _better(metrics: Metrics, best: Metrics, key: str, mode: str) -> bool:
    value = metrics.get(key)
    if not isinstance(value, (int, float)) or value != value:  # missing or NaN: never best
        return False
    if key not in best:
        return True
    return value > best[key] if mode == "max" else value < best[key]


def load_run(run_dir: str | os.PathLike, checkpoint: str = "last",
             validate_task: bool = True) -> tuple[TrainConfig, MoMLM]:
    """The config and the trained model of a run directory (``checkpoint``: "last" or "best");
    ``validate_task=False`` for uses that need no task data (generation)."""
    from momkit.config import load_config

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no config.yaml)")
    path = run_dir / f"{checkpoint}.pt"
    if checkpoint not in ("last", "best") or not path.is_file():
        raise ConfigError(f"checkpoint={checkpoint!r} is invalid: {path} does not exist (use last or best)")
    cfg = load_config(str(run_dir / "config.yaml"), validate_task=validate_task)
    model = MoMLM(cfg.model)
    try:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=False)["model"])
    except Exception as e:  # truncated, corrupt, not a checkpoint, or another model's
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"checkpoint={checkpoint!r}: {path} cannot be loaded ({first})") from None
    return cfg, model.eval()
