"""Training: learning on easy MQAR, exact resume, the NaN guard, run directories and metrics."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import torch

from momkit.config import ConfigError, load_config
from momkit.train import NonFiniteError, TrainingInterrupted, load_run, loop, train

TINY = [
    "run.progress=false", "model.hidden_size=32", "model.vocab_size=32", "model.mom.num_heads=2",
    "model.mom.num_memories=3", "model.mom.chunk_size=16", "task.vocab_size=32",
    "task.train=[{num_examples: 256, seq_len: 16, num_kv_pairs: 2}]",
    "task.valid=[{num_examples: 64, seq_len: 16, num_kv_pairs: 2}]",
    "optim.batch_size=32", "optim.max_steps=24", "optim.warmup_steps=4",
    "run.eval_every=6", "run.log_every=3", "run.checkpoint_every=6",
]


def tiny(tmp_path, *extra):
    return load_config("mqar_tiny", [*TINY, f"run.dir={tmp_path / 'run'}", *extra])


def _without_time(events):
    return [{k: v for k, v in e.items() if k not in ("elapsed_s", "tokens_per_s")} for e in events]


def test_run_directory_holds_config_metrics_and_checkpoints(tmp_path):
    cfg = tiny(tmp_path)
    result = train(cfg)
    run = tmp_path / "run"
    assert {p.name for p in run.iterdir()} >= {"config.yaml", "metrics.jsonl", "last.pt", "best.pt"}
    saved = load_config(str(run / "config.yaml"))
    assert saved == cfg
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_events = [e for e in events if e.get("split") == "train"]
    valid_events = [e for e in events if e.get("split") == "valid"]
    assert [e["step"] for e in train_events] == list(range(3, 25, 3))
    assert [e["step"] for e in valid_events] == [6, 12, 18, 24]
    for e in train_events:
        assert {"loss", "ce_loss", "aux_loss", "accuracy", "lr", "load_imbalance", "router_entropy"} <= set(e)
    assert {"valid/loss", "valid/accuracy", "valid/load", "valid/load_imbalance"} <= set(valid_events[0])
    assert result.steps == 24 and result.stopped == "max_steps"
    assert result.final == {k: v for k, v in valid_events[-1].items() if k.startswith("valid/")}
    # eval of the saved run reproduces the last evaluation
    _, model = load_run(run)
    from momkit.train import evaluate

    again = evaluate(model, cfg.task_config().build(), cfg.optim.batch_size, torch.device("cpu"))
    assert again["valid/accuracy"] == pytest.approx(result.final["valid/accuracy"])


def test_resume_after_a_crash_mid_run_is_exact(tmp_path, monkeypatch):
    """A run killed at step 12 (after its step-6 checkpoint) and resumed equals an uninterrupted one."""
    ref = train(tiny(tmp_path / "ref"))
    cfg = tiny(tmp_path / "crash")

    def crash(step, metrics):
        if step == 12:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, callback=crash)  # dies at the step-12 evaluation, before its step-12 checkpoint
    resumed = train(cfg, resume=True)
    ev_ref = [e for e in ref.history if "split" in e]
    ev_res = [e for e in resumed.history if "split" in e]
    assert _without_time(ev_ref) == _without_time(ev_res)
    with pytest.raises(ConfigError, match=r"cannot resume .* different config: optim.lr \(0.01 -> 0.5\); "):
        train(tiny(tmp_path / "crash", "optim.lr=0.5"), resume=True)


@pytest.fixture
def python_sigint():
    """SIGINT handled by Python's own handler (a test runner's worker may have another) for the test."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


def test_ctrl_c_stops_at_the_end_of_the_step_with_a_checkpoint_and_resume_is_exact(tmp_path, python_sigint):
    """Ctrl-C at step 6, long before the first periodic checkpoint and mid-way through a log window: the run
    writes last.pt at step 6 and raises KeyboardInterrupt; resumed, it logs what an uninterrupted run logs."""
    extra = ("run.checkpoint_every=100", "run.log_every=4")
    ref = train(tiny(tmp_path / "ref", *extra))
    cfg = tiny(tmp_path / "cut", *extra)

    def ctrl_c(step, metrics):
        if step == 6:  # one Ctrl-C reaching the process twice (its process group, then its parent)
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted, match=r"training stopped at step 6 of 24; its checkpoint .*last\.pt "
                       r"goes on with resume=True \(momkit train \.\.\. --resume\)$"):
        train(cfg, callback=ctrl_c)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert torch.load(tmp_path / "cut" / "run" / "last.pt", weights_only=False)["state"]["step"] == 6
    resumed = train(cfg, resume=True)
    assert _without_time([e for e in resumed.history if "split" in e]) == \
        _without_time([e for e in ref.history if "split" in e])


def test_a_second_ctrl_c_a_second_later_stops_at_once(python_sigint, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(loop.time, "monotonic", lambda: clock[0])
    stop = loop.StopAtStepEnd()
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested
        clock[0] += 0.5
        os.kill(os.getpid(), signal.SIGINT)  # the same Ctrl-C arriving again: still held
        clock[0] += 0.5
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs at the next bytecode, within the sleep
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_is_left_alone_off_the_main_thread_under_another_handler_and_under_torchrun(python_sigint):
    def mine(signum, frame):
        pass

    for enabled, handler, in_thread in [(True, signal.default_int_handler, True), (True, mine, False),
                                        (False, signal.default_int_handler, False)]:
        signal.signal(signal.SIGINT, handler)
        stop = loop.StopAtStepEnd(enabled=enabled)
        if in_thread:
            t = threading.Thread(target=stop.install)
            t.start()
            t.join()
        else:
            stop.install()
        assert signal.getsignal(signal.SIGINT) is handler
        stop.restore()


@pytest.mark.gpu
def test_resume_on_a_gpu_restores_the_random_generators(tmp_path):
    """A run on CUDA resumed from its checkpoint (read onto the GPU, random generator states included) goes on
    to the end with the same evaluation steps as an uninterrupted one."""
    ref = train(tiny(tmp_path / "ref", "run.device=cuda"))
    cfg = tiny(tmp_path / "crash", "run.device=cuda")

    def crash(step, metrics):
        if step == 12:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, callback=crash)
    resumed = train(cfg, resume=True)
    assert resumed.steps == ref.steps == 24
    assert [e["step"] for e in resumed.history if e.get("split") == "valid"] == [6, 12, 18, 24]


def test_in_order_data_feeds_the_segments_in_order_every_epoch_and_resumes_exactly(tmp_path, monkeypatch):
    """``optim.data_order=in_order``: segment by segment, examples in order, the same each epoch (zoology's
    order); a run killed after its step-2 checkpoint and resumed sees the same batches and logs the same."""
    import momkit.models.lm as lm

    fed: list[torch.Tensor] = []
    real_forward = lm.MoMLM.forward

    def recording(self, input_ids, *args, **kwargs):
        if self.training:
            fed.append(input_ids.clone())
        return real_forward(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(lm.MoMLM, "forward", recording)
    extra = ["optim.data_order=in_order", "optim.max_steps=5", "run.eval_every=2", "run.checkpoint_every=2",
             "run.eval_batches=1",
             "task.train=[{num_examples: 64, seq_len: 16, num_kv_pairs: 2}, "
             "{num_examples: 32, seq_len: 20, num_kv_pairs: 3}]"]
    cfg = tiny(tmp_path / "ref", *extra)
    ref = train(cfg)
    epoch = [b.inputs for b in cfg.task_config().build().batches("train", cfg.optim.batch_size)]
    assert [x.shape[1] for x in epoch] == [16, 16, 20]
    expected = (epoch + epoch)[:5]
    assert len(fed) == 5 and all(torch.equal(a, b) for a, b in zip(fed, expected))

    def crash(step, metrics):
        if step == 4:
            raise KeyboardInterrupt

    fed.clear()
    with pytest.raises(KeyboardInterrupt):
        train(tiny(tmp_path / "crash", *extra), callback=crash)
    fed.clear()
    resumed = train(tiny(tmp_path / "crash", *extra), resume=True)
    assert all(torch.equal(a, b) for a, b in zip(fed, expected[2:], strict=True))
    ev_ref = [e for e in ref.history if "split" in e]
    assert _without_time(ev_ref) == _without_time([e for e in resumed.history if "split" in e])


def test_nonfinite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = tiny(tmp_path)
    import momkit.models.lm as lm

    real_forward = lm.MoMLM.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 9:  # the 9th training step
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(lm.MoMLM, "forward", poisoned)
    with pytest.raises(NonFiniteError, match=r"step 9: loss is nan"):
        train(cfg)
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert ckpt["state"]["step"] == 6  # the last good one, not overwritten
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["event"] == "nonfinite" and "step 9" in last["message"]


def test_nonfinite_gradient_names_the_parameter(tmp_path, monkeypatch):
    cfg = tiny(tmp_path)
    import momkit.models.lm as lm

    real_forward = lm.MoMLM.forward

    class InfiniteGradient(torch.autograd.Function):  # value 0, gradient inf
        @staticmethod
        def forward(ctx, w):
            ctx.shape = w.shape
            return w.sum() * 0

        @staticmethod
        def backward(ctx, g):
            return torch.full(ctx.shape, float("inf"))

    def poisoned(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        if self.training:
            w = self.blocks[0].mixer.o_proj.weight
            out.loss = out.loss + InfiniteGradient.apply(w)
        return out

    monkeypatch.setattr(lm.MoMLM, "forward", poisoned)
    with pytest.raises(NonFiniteError, match=r"step 1: the gradient of blocks.0.mixer.o_proj.weight is not finite"):
        train(cfg)


def test_existing_run_directory_needs_resume_or_overwrite(tmp_path):
    cfg = tiny(tmp_path, "optim.max_steps=3", "run.eval_every=3")
    train(cfg)
    with pytest.raises(ConfigError, match=r"already exists: continue it with --resume \(resume=True\) or start over "
                                          r"with --overwrite \(overwrite=True\)"):
        train(cfg)
    train(cfg, overwrite=True)
    with pytest.raises(ConfigError, match="no checkpoint"):
        train(tiny(tmp_path / "nothing"), resume=True)


def _files(root):
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def test_overwrite_deletes_the_old_run_only_once_every_check_passed(tmp_path):
    cfg = tiny(tmp_path, "optim.max_steps=3", "run.eval_every=3")
    train(cfg)
    before = _files(tmp_path / "run")
    with pytest.raises(ConfigError, match=r"model.vocab_size=16 is invalid: the task needs at least 32"):
        train(tiny(tmp_path, "optim.max_steps=3", "model.vocab_size=16"), overwrite=True)
    assert _files(tmp_path / "run") == before


def _evaluate_to(accuracy):
    """``evaluate`` as the loop calls it, with a fixed valid accuracy."""
    from momkit.train import loop

    real = loop.evaluate

    def fake(*args, **kwargs):
        return {**real(*args, **kwargs), "valid/accuracy": accuracy}

    return fake


def test_resuming_a_finished_run_says_it_is_complete_and_changes_nothing(tmp_path, monkeypatch):
    from momkit.train import loop

    cfg = tiny(tmp_path, "optim.max_steps=6")
    train(cfg)
    before = _files(tmp_path / "run")
    with pytest.raises(ConfigError, match=r"the run is complete \(6 steps of optim.max_steps=6\); to train it "
                                          r"further pass a larger optim.max_steps, e.g. optim.max_steps=12"):
        train(cfg, resume=True)
    assert _files(tmp_path / "run") == before
    assert train(tiny(tmp_path, "optim.max_steps=12"), resume=True).steps == 12

    # stopped early at run.target_accuracy: complete too, until the target is raised or removed
    monkeypatch.setattr(loop, "evaluate", _evaluate_to(0.97))
    early = tiny(tmp_path / "early", "run.target_accuracy=0.95")
    assert train(early).steps == 6
    with pytest.raises(ConfigError, match=r"the run is complete \(at step 6 valid/accuracy=0.9700 reached "
                                          r"run.target_accuracy=0.95\); to train it further raise "
                                          r"run.target_accuracy or set run.target_accuracy=null"):
        train(early, resume=True)
    assert train(tiny(tmp_path / "early", "run.target_accuracy=0.99"), resume=True).steps == 24


def test_progress_bar_shows_the_last_evaluation_and_ends_where_training_stopped(tmp_path, monkeypatch, capsys):
    from momkit.train import loop

    monkeypatch.setattr(loop, "evaluate", _evaluate_to(0.97))
    cfg = tiny(tmp_path, "run.progress=true", "run.target_accuracy=0.95")
    assert train(cfg).steps == 6
    last = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert "100%" in last and " 6/6 " in last and "val_accuracy=0.9700" in last, last


def test_model_vocabulary_must_cover_the_task(tmp_path):
    with pytest.raises(ConfigError, match=r"model.vocab_size=16 is invalid: the task needs at least 32"):
        train(tiny(tmp_path, "model.vocab_size=16"))


def test_weight_decay_groups_skip_norms_biases_and_gates():
    from momkit import LMConfig, MoMConfig, MoMLM
    from momkit.train import param_groups

    model = MoMLM(LMConfig(vocab_size=16, hidden_size=16, mom=MoMConfig(hidden_size=None, num_heads=2)))
    decay, keep = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    kept = {names[id(p)] for p in keep["params"]}
    decayed = {names[id(p)] for p in decay["params"]}
    assert any("A_log" in n for n in kept) and any("dt_bias" in n for n in kept)
    assert any(n.endswith("norm1.weight") for n in kept)
    assert any(".gates." in n and n.endswith("weight") for n in kept)  # gate projections
    assert "embed.weight" in decayed and any("k_proj" in n for n in decayed)
    assert keep["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1


@pytest.mark.slow
def test_tiny_mom_learns_easy_mqar(tmp_path):
    """A tiny MoM model on easy MQAR reaches >= 0.9 valid accuracy on CPU."""
    cfg = load_config("mqar_tiny", ["run.progress=false", f"run.dir={tmp_path / 'run'}"])
    result = train(cfg)
    assert result.best["valid/accuracy"] >= 0.9, result.best
    assert result.stopped == "target_accuracy" and result.steps < cfg.optim.max_steps


def test_best_evaluation_follows_best_metric_and_mode(tmp_path):
    result = train(tiny(tmp_path, "run.best_metric=valid/loss", "run.best_mode=min"))
    losses = [e["valid/loss"] for e in result.history if e.get("split") == "valid"]
    assert result.best["valid/loss"] == min(losses)
    with pytest.raises(ConfigError, match=r"run.best_mode='low' is invalid: one of max, min"):
        tiny(tmp_path, "run.best_mode=low")


def test_bad_data_order_and_router_weights_are_one_line_config_errors():
    with pytest.raises(ConfigError, match=r"^optim.data_order='zoology' is invalid: one of shuffled, in_order$"):
        load_config("mqar_tiny", ["optim.data_order=zoology"])
    with pytest.raises(ConfigError, match=r"^model.mom.router_weights='softmax' is invalid: one of renormalized, "
                                          r"unnormalized$"):
        load_config("mqar_tiny", ["model.mom.router_weights=softmax"])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_adamw_is_fused_on_a_gpu_only(device):
    from momkit.config import OptimConfig
    from momkit.train import make_optimizer

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4)).to(device)
    opt, _ = make_optimizer(model, OptimConfig())
    assert bool(opt.defaults.get("fused")) == (device == "cuda")
    assert [g["weight_decay"] for g in opt.param_groups] == [OptimConfig().weight_decay, 0.0]
