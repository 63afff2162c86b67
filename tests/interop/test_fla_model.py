"""momkit.interop on whole models: fla's MomForCausalLM (2 layers, random weights, on CPU) -> MoMLM with the
same parameter count, logits and balancing loss, and back to fla's state dict key for key."""

from __future__ import annotations

import pytest
import torch


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _fla_model(shared=True, single=False, tie=False):
    from momkit.interop import fla_mom_model

    MomConfig, MomForCausalLM = fla_mom_model()
    torch.manual_seed(0)
    cfg = MomConfig(hidden_size=32, num_hidden_layers=2, vocab_size=61, num_heads=2, head_dim=8, expand_v=1.0,
                    num_memories=3, topk=2, shared_mem=shared, single_kv_proj=single, tie_word_embeddings=tie,
                    fuse_norm=False, fuse_swiglu=False, fuse_cross_entropy=False)
    return MomForCausalLM(cfg).eval()


@pytest.mark.parametrize("kw", [dict(), dict(shared=False, tie=True), dict(single=True)],
                         ids=["shared", "no-shared-tied", "single-kv"])
def test_model_from_fla_computes_the_same_function(fla_cpu, kw):
    from momkit.interop import fla_config, from_fla, to_fla

    ref = _fla_model(**kw)
    model = from_fla(ref).eval()
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in ref.parameters())
    ids = torch.randint(0, 61, (2, 13))
    out_ref = ref(input_ids=ids, labels=ids, use_cache=False)
    out = model(ids)
    assert _rel(out.logits.detach(), out_ref.logits.detach()) < 1e-5, "logits"
    torch.testing.assert_close(out.aux_loss.double(), (out_ref.aux_loss * ref.config.aux_loss_scale).double(),
                               rtol=1e-6, atol=1e-9)

    state, original = to_fla(model), ref.state_dict()
    assert set(state) == set(original)
    for key, value in original.items():
        assert state[key].shape == value.shape and torch.equal(state[key], value), key
    from momkit.interop import fla_mom_model

    _, MomForCausalLM = fla_mom_model()
    again = MomForCausalLM(fla_config(model.cfg))
    again.load_state_dict(state)  # strict


def test_convert_round_trip_through_a_run_directory(fla_cpu, tmp_path):
    """fla folder -> momkit run directory -> fla folder: the weights come back equal, the run loads."""
    from momkit.interop import convert, fla_mom_model
    from momkit.train import load_run

    ref = _fla_model()
    ref.save_pretrained(str(tmp_path / "fla"))
    print(convert(tmp_path / "fla", tmp_path / "run"))
    _, model = load_run(tmp_path / "run", validate_task=False)
    ids = torch.randint(0, 61, (1, 9))
    assert _rel(model(ids).logits.detach(), ref(input_ids=ids, use_cache=False).logits.detach()) < 1e-5
    convert(tmp_path / "run", tmp_path / "back")
    _, MomForCausalLM = fla_mom_model()
    back = MomForCausalLM.from_pretrained(str(tmp_path / "back"))
    for key, value in ref.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_convert_command_names_bad_paths(tmp_path):
    import subprocess
    import sys

    (tmp_path / "empty").mkdir()
    (tmp_path / "taken").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"model_type": "llama"}')
    cases = [([str(tmp_path / "nope"), str(tmp_path / "x")], "is not a folder"),
             ([str(tmp_path / "empty"), str(tmp_path / "taken")], "exists: name a new folder"),
             ([str(tmp_path / "empty"), str(tmp_path / "x")], "is neither a momkit run directory"),
             ([str(tmp_path / "other"), str(tmp_path / "x")], "holds a 'llama' model")]
    for argv, message in cases:
        r = subprocess.run([sys.executable, "-m", "momkit", "convert", *argv], capture_output=True, text=True,
                           cwd=tmp_path)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (argv, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
