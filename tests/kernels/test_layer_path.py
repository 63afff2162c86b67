"""The layers on their kernel path (``impl="triton"``: the rule's Triton kernels and the fused layer ops)
against the same layers in float64 on the token loop (``impl="recurrent"``): output and every parameter's
gradient, with left padding (MoM's dispatch then packs segments of unequal lengths)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from momkit import MoMConfig, MoMLayer, SingleMemoryLayer

F64 = torch.float64


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _assert_gradients_match(module: torch.nn.Module, ref64: torch.nn.Module) -> None:
    """Every parameter's gradient against the float64 copy's (both None, or within 1e-4 relative)."""
    grads64 = dict(ref64.named_parameters())
    for name, p in module.named_parameters():
        if p.grad is None:
            assert grads64[name].grad is None, f"no gradient for {name}"
            continue
        assert _rel(p.grad.cpu(), grads64[name].grad) < 1e-4, f"gradient of {name}"


OFFICIAL = dict(share_decay=True, share_kv_conv=True, beta_bias=False, single_kv_proj=True,
                shared_uses_routed_proj=True, init="fla")


@pytest.mark.parametrize(("layer_cls", "rule", "options"), [
    (MoMLayer, "gated_deltanet", {}), (SingleMemoryLayer, "gated_deltanet", {}), (MoMLayer, "gla", {}),
    (MoMLayer, "hgrn2", {}), (MoMLayer, "ttt", {}), (MoMLayer, "gated_deltanet", OFFICIAL),
    (MoMLayer, "deltanet", {"groups": True})],
    ids=["mom", "single", "mom-gla", "mom-hgrn2", "mom-ttt", "mom-official", "mom-delta-grouped"])
def test_layer_kernel_path_matches_float64_token_loop(device, layer_cls, rule, options, monkeypatch):
    """gated_deltanet normalises q and k (the fused L2 norm), gla does not; hgrn2 hands the kernels its key
    1 - exp(g) (its k projections get no gradient), ttt titans' zero alpha and eta; "official": the official
    code's parameter sharing (one convolution call over every memory's rows, shared decay parameters);
    "grouped": the delta backward forced to run group by group of the packed segments."""
    options = dict(options)
    if options.pop("groups", False):
        import momkit.kernels.delta.chunk as delta_chunk

        monkeypatch.setattr(delta_chunk, "STATE_BUDGET", 1)
        monkeypatch.setattr(delta_chunk, "program_slots", lambda device: 1)
    torch.manual_seed(0)
    cfg = MoMConfig(hidden_size=32, num_heads=2, head_dim=16, rule=rule, num_memories=3, topk=2,
                    shared_memory=True, impl="triton", **options)
    layer = layer_cls(cfg)
    ref = copy.deepcopy(layer).double()
    ref.cfg = dataclasses.replace(cfg, impl="recurrent")
    B, T = 2, 70
    x = torch.randn(B, T, 32)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, :9] = False
    dy = torch.randn(B, T, 32)

    y64, _ = ref(x.double(), attention_mask=mask)
    (y64 * dy.double())[mask].sum().backward()
    layer = layer.to(device)
    y, _ = layer(x.to(device), attention_mask=mask.to(device))
    (y * dy.to(device))[mask.to(device)].sum().backward()

    assert _rel(y.cpu()[mask], y64[mask]) < 1e-4, "output"
    _assert_gradients_match(layer, ref)


@pytest.mark.parametrize("mixer", ["mom", "single"])
def test_model_kernel_path_matches_float64_token_loop(device, mixer):
    """A two-block MoMLM on its kernel path (the mixers' kernels and the blocks' fused RMSNorms) against the same
    model in float64 on the token loop: logits, loss and every parameter's gradient."""
    from momkit import LMConfig, MoMLM

    torch.manual_seed(0)
    mom = MoMConfig(hidden_size=None, num_heads=2, head_dim=16, rule="gated_deltanet", num_memories=3, topk=2,
                    shared_memory=True, impl="triton")
    model = MoMLM(LMConfig(vocab_size=50, num_layers=2, hidden_size=32, mixer=mixer, mom=mom))
    with torch.no_grad():  # norm weights away from 1, so that their use is checked too
        for name, p in model.named_parameters():
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight":
                p.add_(0.3 * torch.randn_like(p))
    ref = copy.deepcopy(model).double()
    ref.cfg = dataclasses.replace(model.cfg, mom=dataclasses.replace(mom, impl="recurrent"))
    for block in ref.blocks:
        block.mixer.cfg = dataclasses.replace(block.mixer.cfg, impl="recurrent")
    ids = torch.randint(0, 50, (2, 71))
    out64 = ref(ids[:, :-1], labels=ids[:, 1:])
    out64.loss.backward()
    model = model.to(device)
    out = model(ids[:, :-1].to(device), labels=ids[:, 1:].to(device))
    out.loss.backward()
    assert _rel(out.logits.cpu(), out64.logits) < 1e-4, "logits"
    assert abs(out.loss.item() - out64.loss.item()) < 1e-4 * abs(out64.loss.item()), "loss"
    _assert_gradients_match(model, ref)
