"""The momkit command: end to end on a tiny config, and one-line errors (exit 2, nothing written)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

TINY = [
    "model.hidden_size=32", "model.vocab_size=32", "model.mom.num_heads=2", "model.mom.num_memories=2",
    "model.mom.chunk_size=16", "task.vocab_size=32",
    "task.train=[{num_examples: 64, seq_len: 16, num_kv_pairs: 2}]",
    "task.valid=[{num_examples: 32, seq_len: 16, num_kv_pairs: 2}]",
    "optim.batch_size=32", "optim.max_steps=4", "optim.warmup_steps=1", "run.eval_every=2", "run.log_every=1",
]


def momkit(*args, cwd):
    return subprocess.run([sys.executable, "-m", "momkit", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_train_eval_and_info_end_to_end(tmp_path):
    run = tmp_path / "runs" / "tiny"
    r = momkit("train", "mqar_tiny", *TINY, f"run.dir={run}", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "4 steps (max_steps)" in r.stdout
    assert (run / "metrics.jsonl").is_file() and (run / "last.pt").is_file()
    r = momkit("eval", str(run), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert 0 <= json.loads(r.stdout)["valid/accuracy"] <= 1
    # the same run directory again: refused, then resumed with more steps
    r = momkit("train", "mqar_tiny", *TINY, f"run.dir={run}", cwd=tmp_path)
    assert r.returncode == 2 and "already exists; pass --resume" in r.stderr
    r = momkit("train", "mqar_tiny", *TINY, "optim.max_steps=6", f"run.dir={run}", "--resume", "--no-progress",
               cwd=tmp_path)
    assert r.returncode == 0 and "6 steps" in r.stdout, r.stderr
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


def test_help_on_every_command(tmp_path):
    for cmd in ([], ["train"], ["eval"], ["info"]):
        r = momkit(*cmd, "--help", cwd=tmp_path)
        assert r.returncode == 0 and "usage: momkit" in r.stdout
