"""`momkit generate`: a trained text LM continues a prompt (its output is MoMLM.generate's), and bad input is
one line, exit 2. Run in-process (``cli.main``; the process-wide CPU tuning is left out)."""

from __future__ import annotations

import pytest
import torch

from momkit import MoMLM, cli
from momkit.config import config_to_yaml, load_config
from momkit.tasks.text import ByteTokenizer

SMALL = ["model.hidden_size=32", "model.num_layers=1", "model.mom.num_heads=2", "model.mom.chunk_size=16"]


@pytest.fixture
def momkit(monkeypatch, capsys):
    monkeypatch.setattr("momkit.runtime.tune_cpu", lambda: {})

    def run(*args):
        try:
            code = cli.main(list(args))
        except SystemExit as e:  # argparse errors
            code = e.code
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def make_run(path, config, overrides):
    """A run directory as training leaves it: config.yaml and last.pt (untrained weights)."""
    cfg = load_config(config, overrides)
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(config_to_yaml(cfg))
    torch.manual_seed(0)
    model = MoMLM(cfg.model)
    torch.save({"model": model.state_dict()}, path / "last.pt")
    return model.eval()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    (root / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40)
    text = make_run(root / "text", "text_tiny", [f"task.paths=[{root / 'corpus.txt'}]", "task.seq_len=32", *SMALL])
    (root / "corpus.txt").unlink()  # generation needs no training data
    make_run(root / "mqar", "mqar_tiny", SMALL)
    return root, text


def test_generate_continues_the_prompt_like_the_model(runs, momkit):
    root, model = runs
    prompt = "the quick é"
    tok = ByteTokenizer()
    ids = tok.encode(prompt)[None]
    greedy = tok.decode(model.generate(ids, 12)[0])
    sampled = tok.decode(model.generate(ids, 12, temperature=0.8, top_k=5,
                                        generator=torch.Generator().manual_seed(3))[0])
    assert greedy != sampled
    code, out, err = momkit("generate", str(root / "text"), "--prompt", prompt, "--max-new-tokens", "12",
                            "--temperature", "0", "--device", "cpu")
    assert code == 0, err
    assert out == greedy + "\n"
    assert "12 tokens in" in err and "tokens/s" in err
    code, out, err = momkit("generate", str(root / "text"), "--prompt", prompt, "--max-new-tokens", "12",
                            "--top-k", "5", "--seed", "3", "--stream")
    assert code == 0, err
    assert out == sampled + "\n"


@pytest.mark.parametrize(("args", "message"), [
    (["no/such/run", "--prompt", "a"], "RUN_DIR='no/such/run' is not a run directory (no config.yaml)"),
    (["{root}/mqar", "--prompt", "a"], "was trained on task 'mqar': generate needs a text language model"),
    (["{root}/text", "--prompt", ""], "--prompt='' is invalid: must be non-empty text"),
    (["{root}/text"], "the following arguments are required: --prompt"),
    (["{root}/text", "--prompt", "a", "--max-new-tokens", "0"], "--max-new-tokens=0 is invalid"),
    (["{root}/text", "--prompt", "a", "--temperature", "-1"], "--temperature=-1.0 is invalid: must be >= 0"),
    (["{root}/text", "--prompt", "a", "--top-k", "0"], "--top-k=0 is invalid: must be a positive int"),
    (["{root}/text", "--prompt", "a", "--checkpoint", "best"], "checkpoint='best' is invalid"),
    (["{root}/text", "--prompt", "a", "--device", "cpu", "--cuda-graph"],
     "--cuda-graph needs a CUDA device; this run decodes on cpu"),
])
def test_bad_input_is_one_line_exit_2(runs, momkit, args, message):
    root, _ = runs
    code, out, err = momkit("generate", *[a.format(root=root) for a in args])
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("momkit: error:") and message in lines[0], err
