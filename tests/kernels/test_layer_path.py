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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_grouped_linear_matches_one_product_per_group(device, dtype):
    """Every memory's rows through its own projection: one grouped product in bfloat16 (torch._grouped_mm),
    one product per group otherwise; output and gradients against float64, with an empty group."""
    from momkit.layers.mom import grouped_linear

    gen = torch.Generator().manual_seed(2)
    rows = [(0, 37), (37, 37), (37, 100), (100, 131)]
    x = torch.randn(131, 64, generator=gen)
    w = torch.randn(4, 48, 64, generator=gen) / 8
    dy = torch.randn(131, 48, generator=gen)
    x64, w64 = x.double().requires_grad_(True), w.double().requires_grad_(True)
    ref = torch.cat([x64[a:b] @ w64[g].T for g, (a, b) in enumerate(rows)])
    ref.backward(dy.double())
    xd = x.to(device=device, dtype=dtype).requires_grad_(True)
    wd = w.to(device).requires_grad_(True)
    ends = torch.tensor([b for _, b in rows], device=device)
    y = grouped_linear(xd, wd, rows, ends)
    y.backward(dy.to(device=device, dtype=dtype))
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert y.dtype == dtype and _rel(y.cpu(), ref) < tol
    assert _rel(xd.grad.cpu(), x64.grad) < tol and _rel(wd.grad.cpu(), w64.grad) < tol
    assert wd.grad[1].abs().max() == 0  # the empty group


def test_mom_layer_under_bfloat16_autocast_takes_one_grouped_product(device, monkeypatch):
    """The MoM layer's kernel path under bfloat16 autocast: every memory's k | v projection is one grouped
    product, and the layer still matches the float64 token loop to bfloat16's precision."""
    calls = []
    grouped_mm = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append(1) or grouped_mm(*a, **k))
    torch.manual_seed(0)
    cfg = MoMConfig(hidden_size=64, num_heads=2, head_dim=16, rule="gated_deltanet", num_memories=3, topk=2,
                    shared_memory=True, impl="triton")
    layer = MoMLayer(cfg)
    ref = copy.deepcopy(layer).double()
    ref.cfg = dataclasses.replace(cfg, impl="recurrent")
    x = torch.randn(2, 40, 64)
    y64, _ = ref(x.double())
    layer = layer.to(device)
    kind = torch.device(device).type
    with torch.autocast(kind, dtype=torch.bfloat16):
        y, _ = layer(x.to(device))
    y.float().sum().backward()
    # torch's grouped product runs on the CPU and, on CUDA, from Hopper on
    assert calls == ([1] if kind == "cpu" or torch.cuda.get_device_capability() >= (9, 0) else [])
    assert _rel(y.float().cpu(), y64) < 3e-2
    assert all(p.grad is not None for n, p in layer.named_parameters() if "k_proj" in n or "v_proj" in n)
