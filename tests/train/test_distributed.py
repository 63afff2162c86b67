"""Data-parallel training on CPU (gloo, 2 ranks under torchrun): the same parameters as one process on the
same global batch, resume from 2 ranks to 1, rank-0-only writes, clear errors and no hang on failure."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from momkit.cli import main
from momkit.config import ConfigError, load_config
from momkit.train import train
from momkit.train.distributed import data_parallel

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
TINY = [
    "run.progress=false", "run.threads=1", "model.hidden_size=32", "model.vocab_size=32", "model.mom.num_heads=2",
    "model.mom.num_memories=3", "model.mom.chunk_size=16", "model.mom.aux_loss_scale=0.1",
    "model.mom.z_loss_scale=0.01", "task.vocab_size=32",
    "task.train=[{num_examples: 256, seq_len: 16, num_kv_pairs: 2}]",
    "task.valid=[{num_examples: 32, seq_len: 16, num_kv_pairs: 2}]",
    "optim.batch_size=32", "optim.warmup_steps=2", "run.eval_every=4", "run.log_every=2", "run.checkpoint_every=4",
]


def _torchrun(args: list[str], script: str = "-m momkit", timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = [TORCHRUN, "--nproc_per_node", "2", "--standalone", *script.split(), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


# Both sides train with float64 parameters: the data-parallel and the one-process runs sum the same gradients in
# another order, and in float32 three AdamW steps carry that rounding to 1e-5 on some machines (some early
# gradients are tiny sums that cancel). In float64 only the float32 steps inside the model remain (about 1e-7 at
# most), so the comparison tells a data-parallel bug (parameters off by order lr = 1e-2) from rounding with room.
FLOAT64_MAIN = """
import sys
import torch
from momkit.cli import main

torch.set_default_dtype(torch.float64)
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(autouse=True)
def _float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _params(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "last.pt", map_location="cpu", weights_only=False)["model"]


def _assert_same_params(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:  # sums in another order: rounding only
        assert a[k].dtype == b[k].dtype == torch.float64, k
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


def _events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# topk_sigmoid: biases updated by the load (fast, so that a bias from the wrong load changes the routing at
# once); 8 memories, top-1 and one sequence per rank, so that some memories get no token of a rank's shard in a
# step (their parameters take no part in that rank's backward pass). It runs 3 steps: a memory's first tokens
# can give it gradients near AdamW's eps, whose rounding the first normalised step would make visible.
ROUTERS = {"topk_softmax": ["model.mom.router=topk_softmax", "optim.max_steps=8"],
           "topk_sigmoid": ["model.mom.router=topk_sigmoid", "model.mom.router_bias_update_rate=0.1",
                            "model.mom.num_memories=8", "model.mom.topk=1", "optim.batch_size=2",
                            "optim.max_steps=3"]}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """A 2-rank run for each of ROUTERS."""
    root = tmp_path_factory.mktemp("ddp")
    script = root / "float64_main.py"
    script.write_text(FLOAT64_MAIN)
    runs = {}
    for router, extra in ROUTERS.items():
        run_dir = root / router
        proc = _torchrun(["train", "mqar_tiny", *TINY, *extra, f"run.dir={run_dir}"], script=str(script))
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[router] = (run_dir, proc)
    return runs


@pytest.mark.parametrize("router", ["topk_softmax", "topk_sigmoid"])
def test_two_ranks_reach_the_parameters_of_one_process(two_ranks, tmp_path, router):
    run_dir, _ = two_ranks[router]
    one = train(load_config("mqar_tiny", [*TINY, *ROUTERS[router],
                                          f"run.dir={tmp_path / 'one'}"]))
    _assert_same_params(_params(run_dir), _params(Path(one.run_dir)))
    # the logged training losses are the global batch's, as one process computes them
    ddp = [e for e in _events(run_dir) if e.get("split") == "train"]
    ref = [e for e in one.history if e.get("split") == "train"]
    for key in ("loss", "ce_loss", "aux_loss", "accuracy"):
        assert [e[key] for e in ddp] == pytest.approx([e[key] for e in ref], rel=1e-5), key


def test_resume_two_ranks_run_on_one_process(two_ranks, tmp_path):
    run_dir, _ = two_ranks["topk_softmax"]
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed_dir)
    longer = [*TINY, "optim.max_steps=12"]
    resumed = train(load_config("mqar_tiny", [*longer, f"run.dir={resumed_dir}"]), resume=True)
    # the same on one process throughout: 8 steps, then resumed to 12 (the schedule follows optim.max_steps)
    train(load_config("mqar_tiny", [*TINY, "optim.max_steps=8", f"run.dir={tmp_path / 'ref'}"]))
    ref = train(load_config("mqar_tiny", [*longer, f"run.dir={tmp_path / 'ref'}"]), resume=True)
    assert resumed.steps == 12
    _assert_same_params(_params(resumed_dir), _params(Path(ref.run_dir)))
    assert [e["step"] for e in _events(resumed_dir)] == [e["step"] for e in _events(Path(ref.run_dir))]


def test_only_rank_0_writes(two_ranks):
    run_dir, proc = two_ranks["topk_softmax"]
    assert {p.name for p in run_dir.iterdir()} == {"config.yaml", "metrics.jsonl", "last.pt", "best.pt"}
    events = _events(run_dir)
    # every event once (both ranks share this directory: a second writer would double them)
    assert [(e["step"], e.get("split", e.get("event"))) for e in events] == [
        (2, "train"), (4, "train"), (4, "valid"), (6, "train"), (8, "train"), (8, "valid"), (8, "end")]
    assert proc.stdout.count(f"run {run_dir}: 8 steps") == 1


def test_batch_size_not_divisible_by_ranks_is_one_clear_error(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match=r"optim.batch_size=32 is invalid with 3 ranks.*multiple of 3"):
        data_parallel("cpu", 32, 60.0)
    assert main(["train", "mqar_tiny", *TINY, "optim.max_steps=2", "run.dir=unused"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("momkit: error (rank 0 of 3): optim.batch_size=32 is invalid") and "Traceback" not in err


FAILING_RANK = """
import os, sys
import momkit.models.lm as lm
from momkit.cli import main

if os.environ["RANK"] == "1":
    def fail(self):
        raise RuntimeError("injected failure")
    lm.MoMLM.update_routing_biases = fail
sys.exit(main(sys.argv[1:]))
"""


def test_a_failing_rank_stops_the_job_with_its_message(tmp_path):
    script = tmp_path / "failing_rank.py"
    script.write_text(FAILING_RANK)
    t0 = time.perf_counter()
    # the collective timeout is long: the job must end because the failing rank exits, not by timing out
    proc = _torchrun(["train", "mqar_tiny", *TINY, "optim.max_steps=8", "run.dist_timeout_s=600",
                      f"run.dir={tmp_path / 'run'}"], script=str(script), timeout=90)
    assert proc.returncode != 0
    assert "momkit: error (rank 1 of 2): RuntimeError: injected failure; the job stops" in proc.stderr
    assert time.perf_counter() - t0 < 60
