"""The momkit command: end to end on a tiny config, and one-line errors (exit 2, nothing written)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from momkit.config import load_config

TINY = [
    "model.hidden_size=32", "model.vocab_size=32", "model.mom.num_heads=2", "model.mom.num_memories=2",
    "model.mom.chunk_size=16", "task.vocab_size=32",
    "task.train=[{num_examples: 64, seq_len: 16, num_kv_pairs: 2}]",
    "task.valid=[{num_examples: 32, seq_len: 16, num_kv_pairs: 2}]",
    "optim.batch_size=32", "optim.max_steps=4", "optim.warmup_steps=1", "run.eval_every=2", "run.log_every=1",
]


def momkit(*args, cwd):
    # as a user runs it: without the Triton CPU interpreter that the test session turns on (tests/conftest.py)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "momkit", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300, env=env)


def test_train_eval_and_info_end_to_end(tmp_path):
    run = tmp_path / "runs" / "tiny"
    r = momkit("train", "mqar_tiny", *TINY, f"run.dir={run}", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "4 steps (max_steps)" in r.stdout
    assert (run / "metrics.jsonl").is_file() and (run / "last.pt").is_file()
    r = momkit("eval", str(run), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert 0 <= json.loads(r.stdout)["valid/accuracy"] <= 1
    # the same run directory again: refused, then resumed with more steps (overrides after the options)
    r = momkit("train", "mqar_tiny", *TINY, f"run.dir={run}", cwd=tmp_path)
    assert r.returncode == 2 and "already exists: continue it with --resume" in r.stderr
    r = momkit("train", "mqar_tiny", *TINY, f"run.dir={run}", "--resume", "--no-progress", "optim.max_steps=6",
               "run.log_every=2", cwd=tmp_path)
    assert r.returncode == 0 and "6 steps" in r.stdout, r.stderr
    assert load_config(str(run / "config.yaml")).run.log_every == 2
    r = momkit("info", cwd=tmp_path)
    assert r.returncode == 0 and "torch" in r.stdout and "gated_deltanet" in r.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["train", "mqar_tiny", "model.mom.num_memory=8"],
     "unknown key 'model.mom.num_memory'; did you mean 'model.mom.num_memories'?"),
    (["train", "mqar_tiny", "model.num_layers=two"], "model.num_layers: Value 'two'"),
    (["train", "mqar_tiny", "model.mom.topk=9"], "model.mom.topk=9 is invalid: must be <= num_memories=4"),
    (["train", "mqar_tiny", "model.mom.rule=mamba3"], "model.mom.rule='mamba3' is invalid: valid rules:"),
    (["train", "mqar_tiny", "optim.lr=-1"], "optim.lr=-1.0 is invalid: must be > 0"),
    (["train", "mqar_tiny", "task.name=mqr"], "task.name='mqr' is not a known task; did you mean 'mqar'?"),
    (["train", "no_such_config"], "config 'no_such_config' is neither a packaged config"),
    (["train", "mqar_tiny", "lr"], "override 'lr' must look like key=value"),
    (["eval", "does/not/exist"], "is not a run directory"),
    (["train", "mqar_tiny", "--resume", "--overwrite"], "not allowed with argument"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, args, message):
    r = momkit(*args, cwd=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("momkit: error:") and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_in_train_says_where_the_run_stopped_and_resume_goes_on_from_there(tmp_path):
    """SIGINT to a running `momkit train` (a terminal's Ctrl-C): exit 130 with one line naming the step reached
    and the checkpoint written there, and `--resume` continues from that step."""
    import signal
    import time

    run = tmp_path / "runs" / "tiny"
    args = ["train", "mqar_tiny", *TINY, "optim.max_steps=100000", "run.checkpoint_every=100000",
            f"run.dir={run}", "--no-progress"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.Popen([sys.executable, "-m", "momkit", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 3) and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    step = torch.load(run / "last.pt", weights_only=False)["state"]["step"]
    assert step >= 3
    assert err.strip().splitlines()[-1] == (f"momkit: interrupted: training stopped at step {step} of 100000; its "
                                            f"checkpoint {run / 'last.pt'} goes on with resume=True (momkit train "
                                            "... --resume)")
    r = momkit("train", "mqar_tiny", *TINY, f"optim.max_steps={step + 2}", f"run.dir={run}", "--no-progress",
               "--resume", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"{step + 2} steps (max_steps)" in r.stdout


def test_help_on_every_command(tmp_path):
    for cmd in ([], ["train"], ["eval"], ["info"]):
        r = momkit(*cmd, "--help", cwd=tmp_path)
        assert r.returncode == 0 and "usage: momkit" in r.stdout


# ------------------------------------------------------------------------ bad input in a working directory
def _tiny_config() -> dict:
    """TINY as a YAML config of its own (no packaged base)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.from_dotlist(TINY))


def _spec(**sections) -> str:
    return yaml.safe_dump({"base": "tiny.yaml", "space": {"model.mom.topk": [1, 2]}, "sampler": {"name": "grid"},
                           **sections})


FILES = {  # the working directory of every case below
    "tiny.yaml": yaml.safe_dump(_tiny_config()),
    "list.yaml": "- model\n- optim\n",
    "scalar.yaml": "42\n",
    "broken.yaml": "model: {hidden_size: [32,\n",
    "dup.yaml": "optim:\n  lr: 0.1\n  lr: 0.2\n",
    "afile": "a plain file\n",
    "empty_space.yaml": _spec(space={}),
    "list_spec.yaml": "- base: tiny.yaml\n",
    "broken_spec.yaml": "base: tiny.yaml\nspace: {model.mom.topk: [1, 2}\n",
}
BINARY = bytes(range(256))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished 4-step run of tiny.yaml (its run directory)."""
    root = tmp_path_factory.mktemp("finished")
    (root / "tiny.yaml").write_text(FILES["tiny.yaml"])
    r = momkit("train", "tiny.yaml", "run.dir=done", "--no-progress", cwd=root)
    assert r.returncode == 0, r.stderr
    return root / "done"


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:1000])


def _study_with_a_trial(work: Path) -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna.create_study(storage=f"sqlite:///{work / 's.db'}", study_name="s").enqueue_trial({})


# (arguments, the message, what the case needs: "run" = runs/done is the finished run, or a function of the
# working directory that prepares it)
CASES = [
    # a missing config; defaults alone are not a run
    pytest.param(["train"], r"momkit train needs a config first, got nothing: a packaged config \(.*mqar_tiny, ",
                 None, id="no-config"),
    pytest.param(["train", "optim.lr=0.1"], r"needs a config first, got 'optim.lr=0.1'", None, id="override-first"),
    # config files
    pytest.param(["train", "list.yaml"], r"config 'list.yaml' is invalid: its top level must be a mapping of "
                 r"sections \(model, task, optim, run\), got list", None, id="config-list"),
    pytest.param(["train", "scalar.yaml"], r"config 'scalar.yaml' is invalid: .* got int 42", None,
                 id="config-scalar"),
    pytest.param(["train", "broken.yaml"], r"config 'broken.yaml' is not valid YAML: .* \(line 2, column 1\)", None,
                 id="config-not-yaml"),
    pytest.param(["train", "dup.yaml"], r"config 'dup.yaml' is invalid: found duplicate key lr \(line 3, column 3\)",
                 None, id="config-duplicate-key"),
    pytest.param(["train", "binary.yaml"], r"config 'binary.yaml' cannot be read: not a UTF-8 text file", None,
                 id="config-binary"),
    pytest.param(["train", "tiny.yaml", "model=3"], r"model=3 is invalid: must be a mapping \(a section with keys "
                 r"vocab_size, ", None, id="section-scalar"),
    pytest.param(["train", "tiny.yaml", "model.mom=[1]"], r"model.mom=\[1\] is invalid: must be a mapping", None,
                 id="subsection-list"),
    pytest.param(["train", "tiny.yaml", "task=mqar"], r"task='mqar' is invalid: must be a mapping \(with a 'name' "
                 r"key\)", None, id="task-scalar"),
    pytest.param(["train", "tiny.yaml", "--frobnicate"], r"unrecognized arguments: --frobnicate", None,
                 id="unknown-option"),
    # machine: Triton without CUDA (the test runs on a CPU)
    pytest.param(["train", "tiny.yaml", "model.mom.impl=triton"], r"model.mom.impl='triton' is invalid on this "
                 r"machine \(run.device='auto'\): .*Triton kernels need a CUDA device.*; use auto .* or chunked",
                 None, id="triton-without-cuda",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="Triton runs here")),
    pytest.param(["train", "tiny.yaml", "run.device=cuda"], r"run.device='cuda' is invalid: CUDA is not available",
                 None, id="cuda-without-cuda",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here")),
    # run directories
    pytest.param(["train", "tiny.yaml", "run.dir=/proc/momkit-x"], r"run.dir='/proc/momkit-x' is invalid: the run "
                 r"directory /proc/momkit-x cannot be created \(No such file or directory\)", None, id="dir-proc",
                 marks=pytest.mark.skipif(not Path("/proc").is_dir(), reason="no /proc")),
    pytest.param(["train", "tiny.yaml", "run.dir=afile"], r"run.dir='afile' is invalid: afile is a file, not a "
                 "directory", None, id="dir-is-a-file"),
    pytest.param(["train", "tiny.yaml", "run.dir=afile/sub"], r"run.dir='afile/sub' is invalid: the run directory "
                 r"afile/sub cannot be created \(Not a directory\)", None, id="dir-under-a-file"),
    pytest.param(["train", "tiny.yaml", "run.dir=done"], r"run directory done already exists: continue it with "
                 r"--resume \(resume=True\) or start over with --overwrite", "run", id="dir-exists"),
    pytest.param(["train", "tiny.yaml", "run.dir=done", "--overwrite", "model.vocab_size=16"],
                 r"model.vocab_size=16 is invalid: the task needs at least 32", "run", id="overwrite-keeps-on-error"),
    # resume
    pytest.param(["train", "tiny.yaml", "run.dir=done", "--resume"], r"cannot resume done: the run is complete "
                 r"\(4 steps of optim.max_steps=4\); to train it further pass a larger optim.max_steps, e\.g\. "
                 r"optim.max_steps=8", "run", id="resume-complete"),
    pytest.param(["train", "tiny.yaml", "--resume", "run.dir=done", "optim.max_steps=8", "model.mom.topk=1"],
                 r"cannot resume done with a different config: model.mom.topk \(2 -> 1\); a resumed run keeps its "
                 r"model, task and optimizer \(only optim.max_steps and run.\* may change\)", "run",
                 id="resume-changed-model"),
    pytest.param(["train", "tiny.yaml", "run.dir=done", "optim.max_steps=8", "--resume"],
                 r"cannot resume: done/last.pt cannot be read \(PytorchStreamReader failed .*\); it is left as it "
                 r"is: restore it, or start over with --overwrite", lambda w: _truncate(w / "done" / "last.pt"),
                 id="resume-truncated-checkpoint"),
    pytest.param(["train", "tiny.yaml", "run.dir=done", "optim.max_steps=8", "--resume"],
                 r"cannot resume: done/last.pt cannot be read \(.*\); it is left as it is",
                 lambda w: (w / "done" / "last.pt").write_text("not a checkpoint\n"), id="resume-garbage-checkpoint"),
    pytest.param(["train", "tiny.yaml", "run.dir=done", "optim.max_steps=8", "--resume"],
                 r"cannot resume: done/metrics.jsonl line \d+ is not a metrics event: '\{\"",
                 lambda w: _truncate(w / "done" / "metrics.jsonl"), id="resume-truncated-metrics"),
    pytest.param(["train", "tiny.yaml", "run.dir=done", "optim.max_steps=8", "--resume"],
                 r"cannot resume: done has no config.yaml \(not a run directory\)",
                 lambda w: (w / "done" / "config.yaml").unlink(), id="resume-without-config"),
    pytest.param(["train", "tiny.yaml", "run.dir=nothing", "--resume"], r"cannot resume: nothing has no checkpoint",
                 None, id="resume-nothing"),
    pytest.param(["eval", "done"], r"checkpoint='last': done/last.pt cannot be loaded \(PytorchStreamReader",
                 lambda w: _truncate(w / "done" / "last.pt"), id="eval-truncated-checkpoint"),
    pytest.param(["eval", "done", "--batch-size", "0"], r"--batch-size=0 is invalid: must be a positive int", "run",
                 id="eval-batch-size"),
    # sweeps
    pytest.param(["sweep", "empty_space.yaml"], r"sweep spec empty_space.yaml: space=\{\} is invalid: a non-empty "
                 "mapping", None, id="spec-empty-space"),
    pytest.param(["sweep", "list_spec.yaml"], r"sweep spec list_spec.yaml: must be a mapping with keys study, ", None,
                 id="spec-list"),
    pytest.param(["sweep", "broken_spec.yaml"], r"sweep spec broken_spec.yaml: not valid YAML: .*\(line 2, column",
                 None, id="spec-not-yaml"),
    pytest.param(["sweep", "binary.yaml"], r"sweep spec 'binary.yaml' cannot be read: not a UTF-8 text file", None,
                 id="spec-binary"),
    pytest.param(["sweep", "empty_space.yaml", "--storage", "sqlite:///s.db"], r"space=\{\} is invalid", None,
                 id="spec-checked-before-storage"),
    pytest.param(["sweep", "list_spec.yaml", "--storage", "mysql+nodriver://u@h/db"], r"must be a mapping", None,
                 id="spec-before-driver"),
    pytest.param(["sweep", "s.yaml", "--storage", "sqlite:///afile/x.db"],
                 r"--storage='sqlite:///afile/x.db' is invalid: its folder afile cannot be created",
                 lambda w: (w / "s.yaml").write_text(_spec()), id="storage-under-a-file"),
    pytest.param(["sweep", "s.yaml", "--storage", "journal:afile"], r"--storage='journal:afile' is invalid: afile "
                 r"cannot be read as an Optuna journal \(its first line is not a journal entry: b'a plain file\\n'\)",
                 lambda w: (w / "s.yaml").write_text(_spec()), id="journal-not-a-journal"),
    pytest.param(["sweep", "s.yaml", "--storage", "sqlite:///afile"], r"--storage='sqlite:///afile' is invalid: "
                 "cannot open afile: file is not a database", lambda w: (w / "s.yaml").write_text(_spec()),
                 id="sqlite-not-a-database"),
    pytest.param(["sweep", "s.yaml", "--storage", "journal:."], r"--storage='journal:.' is invalid: . is a "
                 "directory; name a file", lambda w: (w / "s.yaml").write_text(_spec()), id="journal-a-directory"),
    pytest.param(["sweep", "s.yaml", "--storage", "postgresql+nodriver://u@h/db"],
                 r"--storage='postgresql\+nodriver://u@h/db' is invalid: unknown database dialect "
                 r"'postgresql\+nodriver'", lambda w: (w / "s.yaml").write_text(_spec()), id="storage-no-driver"),
    pytest.param(["sweep-report", "s", "--out", "afile"], r"--out='afile' is invalid: it is a file; name a "
                 r"directory", None, id="report-out-a-file"),
    pytest.param(["sweep-report", "s", "--storage", "sqlite:///s.db", "--out", "afile/report"],
                 r"--out='afile/report' is invalid: the directory cannot be created \(Not a directory\)",
                 _study_with_a_trial, id="report-out-under-a-file"),
]


@pytest.mark.parametrize(("args", "message", "needs"), CASES)
def test_bad_input_in_a_working_directory(tmp_path, finished_run, args, message, needs):
    """One line naming the key, path or value and what is allowed; exit 2; no traceback; nothing written (the
    files, a run directory and its checkpoints stay exactly as they were)."""
    import re

    work = tmp_path / "work"
    work.mkdir()
    for name, text in FILES.items():
        (work / name).write_text(text)
    (work / "binary.yaml").write_bytes(BINARY)
    if needs is not None:
        shutil.copytree(finished_run, work / "done")
    if callable(needs):
        needs(work)
    before = _snapshot(work)
    r = momkit(*args, cwd=work)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("momkit: error: "), r.stderr
    assert re.search(message, lines[0]), lines[0]
    assert _snapshot(work) == before
