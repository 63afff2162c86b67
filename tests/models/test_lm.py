"""MoMLM: losses, decoding (prefill + step, generate), mixers and hybrid layouts, config errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from momkit import ConfigError, LMConfig, MoMConfig, MoMLM
from momkit.routing import router_names
from momkit.rules import rule_names

V = 40


def make(rule="gated_deltanet", router="topk_softmax", shared=True, conv=True, mixer="mom", layers=2, seed=0, **kw):
    torch.manual_seed(seed)
    mom = MoMConfig(hidden_size=None, num_heads=2, head_dim=4, rule=rule, router=router, num_memories=3,
                    topk=3 if router == "dense" else 2, shared_memory=shared, short_conv=conv, chunk_size=8,
                    rule_options={"mini_batch": 4} if rule in ("titans", "ttt") else {})
    cfg = LMConfig(vocab_size=V, num_layers=layers, hidden_size=16, mixer=mixer, mom=mom, mlp_ratio=2.0, **kw)
    return MoMLM(cfg).double().eval()


def ids(B, T, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("shared", "conv"), [(True, True), (False, False)])
@pytest.mark.parametrize("router", router_names())
@pytest.mark.parametrize("rule", rule_names())
def test_greedy_generate_equals_repeated_full_forward_argmax(rule, router, shared, conv):
    model = make(rule, router, shared, conv)
    prompt = ids(2, 6)
    out = model.generate(prompt, max_new_tokens=5)
    seq = prompt
    for _ in range(5):
        nxt = model(seq).logits[:, -1].argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], 1)
    assert torch.equal(out, seq)


@pytest.mark.parametrize("mixer", ["mom", "single", "attention"])
def test_prefill_then_decode_equals_full_forward_logits(mixer):
    model = make(mixer=mixer)
    x = ids(2, 13)
    full = model(x).logits
    out = model(x[:, :7], use_cache=True)
    cache, steps = out.cache, []
    for t in range(7, 13):
        logits, cache = model.step(x[:, t], cache)
        steps.append(logits)
    torch.testing.assert_close(out.logits, full[:, :7], atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 7:], atol=1e-10, rtol=1e-8)


def test_hybrid_layout_puts_attention_every_nth_block():
    model = make(layers=4, attention_every=2)
    assert [b.kind for b in model.blocks] == ["mom", "attention", "mom", "attention"]
    x = ids(2, 9)
    g = model.generate(x, 4)
    seq = x
    for _ in range(4):
        seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(g, seq)


@pytest.mark.parametrize("mixer", ["mom", "attention"])
def test_left_padded_prompts_generate_like_single_prompts(mixer):
    model = make(mixer=mixer)
    a, b = ids(1, 9, seed=1), ids(1, 5, seed=2)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, :4] = False
    g = model.generate(batch, 4, attention_mask=mask)
    assert torch.equal(g[0], model.generate(a, 4)[0])
    assert torch.equal(g[1, 4:], model.generate(b, 4)[0])


def test_loss_is_cross_entropy_plus_aux_and_aux_reaches_routers():
    model = make().train()
    x = ids(3, 10)
    labels = x.clone()
    labels[:, :3] = -100
    out = model(x, labels=labels)
    ce = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(out.ce_loss, ce)
    assert out.aux_loss > 0
    torch.testing.assert_close(out.loss, ce + out.aux_loss)
    out.aux_loss.backward()
    assert all(b.mixer.router.proj.weight.grad.abs().sum() > 0 for b in model.blocks)
    assert len(out.routing) == 2 and all(r is not None for r in out.routing)


def test_global_and_layerwise_balance():
    x = ids(2, 10)
    glob = make()
    out = glob(x)
    from momkit.routing import load_balancing_loss

    expect = glob.cfg.mom.aux_loss_scale * load_balancing_loss([a.balance for a in out.aux])
    torch.testing.assert_close(out.aux_loss, expect)
    per_layer = make()
    per_layer.cfg.mom.layerwise_balance = True
    out2 = per_layer(x)
    torch.testing.assert_close(out2.aux_loss, sum(a.aux_loss for a in out2.aux) / 2)


def test_sampling_respects_top_k_and_is_seeded():
    model = make()
    x = ids(2, 4)
    a = model.generate(x, 6, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(0))
    b = model.generate(x, 6, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="top_k must be None or a positive int"):
        model.generate(x, 2, top_k=0)


def test_lm_config_errors_name_the_field():
    base = LMConfig(vocab_size=10, hidden_size=16, mom=MoMConfig(hidden_size=None, num_heads=2))
    cases = [
        (dict(mixer="rnn"), r"mixer='rnn' is invalid: one of mom, single, attention"),
        (dict(mom=MoMConfig(hidden_size=32)), r"mom.hidden_size=32 is invalid: must be null \(inherit\) or equal"),
        (dict(mom=MoMConfig(hidden_size=None, topk=9)), r"mom.topk=9 is invalid"),
        (dict(vocab_size=0), r"vocab_size=0 is invalid"),
        (dict(mixer="attention", attention_heads=3), r"attention_heads=3 is invalid: must divide hidden_size=16"),
        (dict(attention_every=-1), r"attention_every=-1 is invalid"),
    ]
    for change, msg in cases:
        with pytest.raises(ConfigError, match=msg):
            MoMLM(dataclasses.replace(base, **change))


@pytest.mark.parametrize("mixer", ["mom", "single", "attention"])
def test_generate_streams_each_token_and_step_advances_caches_in_place(mixer):
    model = make(mixer=mixer)
    x = ids(2, 5)
    seen = []
    out = model.generate(x, 4, on_token=lambda t: seen.append(t.clone()))
    assert torch.equal(torch.stack(seen, 1), out[:, 5:])
    torch.testing.assert_close(model(x, last_logits_only=True).logits, model(x).logits[:, -1:])
    with pytest.raises(ValueError, match="last_logits_only=True computes no loss"):
        model(x, labels=x, last_logits_only=True)
    cache = model(x, use_cache=True, cache_capacity=8).cache
    _, new = model.step(x[:, -1], cache)
    assert all(a is b for a, b in zip(new, cache))
    if mixer == "attention":
        assert [c.capacity for c in cache] == [8, 8] and cache[0].length == 6


def _decode_logits(model, x, prefix, device, dtype, captured=False):
    """Logits of prefill(x[:, :prefix]) then one step per remaining token, in ``dtype`` on ``device``;
    ``captured``: the steps through one captured CUDA graph."""
    import copy

    from momkit.models.graphs import CapturedStep

    model = copy.deepcopy(model).to(device=device, dtype=dtype)
    x = x.to(device)
    with torch.no_grad():
        out = model(x[:, :prefix], use_cache=True, last_logits_only=True)
        cache, steps = out.cache, [out.logits[:, -1]]
        step = CapturedStep(model, cache) if captured else (lambda t: model.step(t, cache)[0])
        for t in range(prefix, x.shape[1]):
            steps.append(step(x[:, t]).clone())
    return torch.stack(steps, 1).double().cpu()


@pytest.mark.parametrize("mixer", ["mom", "single"])
def test_recurrent_layers_advance_their_cache_in_place(mixer):
    """A step writes into the cache's own tensors (what a captured CUDA graph replays against)."""
    from momkit.models.graphs import cache_tensors

    model = make(mixer=mixer)
    x = ids(2, 6)
    cache = model(x[:, :5], use_cache=True).cache
    before = [t.clone() for t in cache_tensors(cache)]
    tensors = cache_tensors(cache)
    model.step(x[:, 5], cache)
    assert all(a is b for a, b in zip(tensors, cache_tensors(cache)))
    assert all(not torch.equal(a, b) for a, b in zip(before, cache_tensors(cache)) if a.is_floating_point())


def test_captured_decoding_refuses_what_it_cannot_capture():
    model = make()
    x = ids(2, 5)
    with pytest.raises(ValueError, match="cuda_graph=True needs the model on a CUDA device, got cpu"):
        model.generate(x, 3, cuda_graph=True)
    with pytest.raises(ValueError, match="cuda_graph must be True or False, got 'yes'"):
        model.generate(x, 3, cuda_graph="yes")
    from momkit.models.graphs import CapturedStep

    with pytest.raises(ValueError, match="needs the model on a CUDA device"):
        CapturedStep(model, model(x, use_cache=True).cache)


@pytest.mark.gpu
def test_captured_decoding_refuses_attention_layers():
    from momkit.models.graphs import CapturedStep

    model = make(mixer="attention").float().cuda()
    x = ids(2, 5).cuda()
    with torch.no_grad():
        cache = model(x, use_cache=True, cache_capacity=8).cache
        with pytest.raises(ValueError, match=r"layers \[0, 1\] are attention layers"):
            CapturedStep(model, cache)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rule", "mixer"), [(r, "mom") for r in rule_names()] + [("gated_deltanet", "single")])
def test_captured_decoding_on_cuda_matches_the_float64_forward(rule, mixer, dtype):
    """The decoding steps replayed from one CUDA graph against the float64 forward, with the bound of the
    uncaptured steps' test; and against those steps themselves (the same kernels: equal up to a few ulps)."""
    torch.manual_seed(0)
    mom = MoMConfig(hidden_size=None, num_heads=2, head_dim=32, rule=rule, router="round_robin", num_memories=3,
                    topk=2, shared_memory=True, rule_options={"mini_batch": 4} if rule in ("titans", "ttt") else {})
    model = MoMLM(LMConfig(vocab_size=V, num_layers=2, hidden_size=64, mixer=mixer, mom=mom)).double().eval()
    x, P = ids(3, 40), 17
    ref = model(x).logits[:, P - 1 :]
    graph = _decode_logits(model, x, P, "cuda", dtype, captured=True)
    eager = _decode_logits(model, x, P, "cuda", dtype)
    err = (graph - ref).abs().max().item()
    lp_err = (_decode_logits(model, x, P, "cpu", dtype) - ref).abs().max().item()
    C, u = (16, 2.0**-24) if dtype == torch.float32 else (8, 2.0**-8)
    atol = C * u * ref.abs().max().item()
    assert err <= 2 * lp_err + atol, f"max error {err:.3e} > 2 * {lp_err:.3e} + {atol:.3e}"
    assert (graph - eager).abs().max().item() <= atol, "the captured steps differ from the same steps uncaptured"


@pytest.mark.gpu
def test_generate_with_cuda_graph_equals_generate_without():
    model = make(rule="gated_deltanet").float().cuda()
    x = ids(2, 7).cuda()
    assert torch.equal(model.generate(x, 12, cuda_graph=True), model.generate(x, 12))


@pytest.mark.gpu
def test_captures_one_after_another_hold_no_more_memory():
    """A capture, freed with its cache, leaves nothing behind: the memory allocated after the fourth of four
    captures in turn (each on a new cache, then freed) is what it was after the second. A new warm-up stream per
    capture held 32 MiB more after each (the cuBLAS workspace PyTorch keeps per stream)."""
    import gc

    from momkit.models.graphs import CapturedStep

    model = make(rule="gated_deltanet").float().cuda().eval()
    x = ids(2, 7).cuda()
    after = []
    for _ in range(4):
        with torch.no_grad():
            cache = model(x, use_cache=True).cache
        step = CapturedStep(model, cache)
        step(x[:, -1])
        del step, cache
        gc.collect()
        torch.cuda.synchronize()
        after.append(torch.cuda.memory_allocated())
    assert after[3] - after[1] <= 2**20, f"allocated after each capture: {[a / 2**20 for a in after]} MiB"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rule", rule_names())
def test_decoding_on_cuda_matches_the_float64_forward(rule, dtype):
    """Prefill (Triton chunk kernels) and batched steps (fused recurrent kernels) on CUDA against the float64
    forward, with the kernel tests' rule: |cuda - ref64| <= 2 |cpu in dtype - ref64| + C u max |ref64|."""
    torch.manual_seed(0)
    mom = MoMConfig(hidden_size=None, num_heads=2, head_dim=32, rule=rule, router="round_robin", num_memories=3,
                    topk=2, shared_memory=True, rule_options={"mini_batch": 4} if rule in ("titans", "ttt") else {})
    # round_robin: fixed routing, no near-tie flips in low precision
    model = MoMLM(LMConfig(vocab_size=V, num_layers=2, hidden_size=64, mom=mom)).double().eval()
    x, P = ids(3, 40), 17
    ref = model(x).logits[:, P - 1 :]
    err = (_decode_logits(model, x, P, "cuda", dtype) - ref).abs().max().item()
    lp_err = (_decode_logits(model, x, P, "cpu", dtype) - ref).abs().max().item()
    C, u = (16, 2.0**-24) if dtype == torch.float32 else (8, 2.0**-8)
    atol = C * u * ref.abs().max().item()
    assert err <= 2 * lp_err + atol, f"max error {err:.3e} > 2 * {lp_err:.3e} + {atol:.3e}"


@pytest.mark.gpu
@pytest.mark.parametrize("mixer", ["mom", "single"])
@pytest.mark.parametrize("rule", ["gated_deltanet", "gla", "linear_attn"])
def test_capacity_model_trains_on_cuda_under_autocast(rule, mixer):
    """The capacity protocol's model (momkit/configs/mqar_capacity.yaml: keys of 16 per head and memory) on
    CUDA under bfloat16 autocast, as `momkit train` runs it: a finite loss near the float64 forward's, and
    finite gradients."""
    import copy

    from momkit.config import load_config

    cfg = load_config("mqar_capacity", [f"model.mixer={mixer}", f"model.mom.rule={rule}"])
    torch.manual_seed(0)
    model = MoMLM(cfg.model)
    x = torch.randint(0, cfg.model.vocab_size, (16, 64), generator=torch.Generator().manual_seed(0))
    ref = copy.deepcopy(model).double()(x, labels=x).loss.item()
    model = model.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(x.cuda(), labels=x.cuda()).loss
    loss.backward()
    assert torch.isfinite(loss).item(), f"loss {loss.item()}"
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients: {bad[:5]}"
    assert abs(loss.item() - ref) <= 0.02 * abs(ref), f"loss {loss.item():.4f} against the float64 forward's {ref:.4f}"
