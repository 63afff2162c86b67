"""momkit.interop against fla's MomAttention itself (on CPU, tests/interop/conftest.py): a converted layer has
the same parameter count and computes the same function (outputs and input gradients), and converts back
to fla's state dict key for key; configs fla cannot hold get one error."""

from __future__ import annotations

import pytest
import torch

from momkit import MoMConfig, MoMLayer


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _fla(MomAttention, shared=True, single=False, expand_v=1.0, seed=0):
    torch.manual_seed(seed)
    return MomAttention(hidden_size=32, head_dim=8, num_heads=2, expand_v=expand_v, num_memories=3, topk=2,
                        shared_mem=shared, single_kv_proj=single, norm_eps=1e-6).eval()


CASES = [dict(), dict(shared=False), dict(single=True), dict(single=True, shared=False), dict(expand_v=2.0)]


@pytest.mark.parametrize("case", CASES, ids=["shared", "no-shared", "single-kv", "single-kv-no-shared", "expand-v-2"])
@pytest.mark.parametrize("T", [11, 3])  # 3: sequences shorter than the convolution
def test_from_fla_computes_the_same_function(fla_cpu, case, T):
    from momkit.interop import from_fla

    ref = _fla(fla_cpu, **case)
    layer = from_fla(ref).eval()
    assert sum(p.numel() for p in layer.parameters()) == sum(p.numel() for p in ref.parameters())
    x = torch.randn(2, T, 32)
    x_ref, x_ours = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    dy = torch.randn(2, T, 32)
    y_ref = ref(x_ref)[0]
    y, aux = layer(x_ours)
    (y_ref * dy).sum().backward()
    (y * dy).sum().backward()
    assert _rel(y.detach(), y_ref.detach()) < 1e-5, "output"
    assert _rel(x_ours.grad, x_ref.grad) < 1e-5, "input gradient"
    logits = ref(x)[3].view(2, T, -1)
    torch.testing.assert_close(aux.plan.logits.float(), logits.float(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=["shared", "no-shared", "single-kv", "single-kv-no-shared", "expand-v-2"])
def test_to_fla_gives_back_the_state_dict_exactly(fla_cpu, case):
    from momkit.interop import fla_kwargs, from_fla, to_fla

    ref = _fla(fla_cpu, **case)
    layer = from_fla(ref)
    state, original = to_fla(layer), ref.state_dict()
    assert list(state) == list(original) or set(state) == set(original)
    for key, value in original.items():
        assert state[key].shape == value.shape and torch.equal(state[key], value), key
    again = fla_cpu(**fla_kwargs(layer.cfg))
    again.load_state_dict(state)  # strict: every key present, none extra


def test_padding_matches_fla(fla_cpu):
    """A left-padded batch: the padded positions are not compared (fla leaves them unspecified)."""
    from momkit.interop import from_fla

    ref = _fla(fla_cpu)
    layer = from_fla(ref).eval()
    x = torch.randn(2, 9, 32)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :4] = 0
    y_ref = ref(x, attention_mask=mask)[0]
    y, _ = layer(x, attention_mask=mask)
    keep = mask.bool()
    assert _rel(y[keep], y_ref[keep]) < 1e-5


@pytest.mark.parametrize(("kw", "message"), [
    (dict(rule="gla"), "rule='gla': fla's MomAttention has only rule='gated_deltanet'"),
    (dict(share_decay=False), "share_decay=False: fla's MomAttention has only share_decay=True"),
    (dict(beta_bias=True), "beta_bias=True: fla's MomAttention has only beta_bias=False"),
    (dict(router="dense", topk=3), "router='dense'"),
])
def test_to_fla_names_what_fla_cannot_hold(kw, message):
    from momkit.interop import InteropError, to_fla

    base = dict(hidden_size=16, num_heads=2, head_dim=4, num_memories=3, topk=2, share_decay=True,
                share_kv_conv=True, beta_bias=False)
    if kw.get("rule") == "gla":
        base.update(share_decay=False, beta_bias=True)
    layer = MoMLayer(MoMConfig(**{**base, **kw}))
    with pytest.raises(InteropError, match=message.replace("(", r"\(")):
        to_fla(layer)


def test_from_fla_rejects_other_objects(fla_cpu):
    from momkit.interop import InteropError, from_fla

    with pytest.raises(InteropError, match="from_fla takes an fla MomAttention or MomForCausalLM, got Linear"):
        from_fla(torch.nn.Linear(2, 2))
