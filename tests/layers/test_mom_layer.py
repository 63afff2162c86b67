"""MoMLayer semantics: equivalence with the single-memory layer, isolation of memories, short-conv
boundaries, padding, decoding, gradients, and config errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from momkit import ConfigError, MoMConfig, MoMLayer, SingleMemoryLayer
from momkit.routing import get_router, router_names
from momkit.rules import rule_names

F64 = torch.float64
D = 16


def make(rule="gated_deltanet", router="topk_softmax", M=3, k=2, shared=True, conv=True, seed=0, **kw):
    torch.manual_seed(seed)
    k = M if router == "dense" else k
    cfg = MoMConfig(hidden_size=D, num_heads=2, head_dim=4, expand_v=1.5, rule=rule, num_memories=M, topk=k,
                    shared_memory=shared, router=router, short_conv=conv, chunk_size=8, **kw)
    return MoMLayer(cfg).double().eval()


# every router, and the learned ones also with router_weights="unnormalized"
ROUTER_VARIANTS = [(r, "renormalized") for r in router_names()] + [
    (r, "unnormalized") for r in router_names() if get_router(r).learned]


def ids_for(B, T, seed=0):
    return torch.randint(0, 1000, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("rule", rule_names())
def test_one_memory_top1_without_shared_equals_single_layer(rule):
    mom = make(rule, M=1, k=1, shared=False)
    single = SingleMemoryLayer(mom.cfg).double()
    state = {key.replace("memories.0.", "memory."): val for key, val in mom.state_dict().items()
             if not key.startswith("router.")}
    single.load_state_dict(state)
    x = torch.randn(2, 21, D, dtype=F64)
    mask = torch.ones(2, 21, dtype=torch.bool)
    mask[1, :5] = False  # left padding in the second sequence
    for m in (None, mask):
        y_mom, _ = mom(x, attention_mask=m)
        y_single, _ = single(x, attention_mask=m)
        keep = torch.ones_like(mask) if m is None else m
        torch.testing.assert_close(y_mom[keep], y_single[keep], atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("conv", [False, True])
def test_round_robin_memories_are_isolated(conv):
    T, p = 20, 6
    layer = make(router="round_robin", M=2, k=1, shared=False, conv=conv)
    x = torch.randn(1, T, D, dtype=F64)
    x2 = x.clone()
    x2[0, p] += torch.randn(D, dtype=F64)
    y, _ = layer(x)
    y2, _ = layer(x2)
    odd = torch.arange(1, T, 2)
    assert torch.equal(y[0, odd], y2[0, odd]), "memory 1 (odd positions) saw a write to memory 0"
    later_even = torch.arange(p + 2, T, 2)
    assert (y[0, later_even] - y2[0, later_even]).abs().amax(-1).min() > 1e-6
    # with a shared memory, the write reaches both
    shared = make(router="round_robin", M=2, k=1, shared=True, conv=conv)
    y, _ = shared(x)
    y2, _ = shared(x2)
    assert (y[0, odd[odd > p]] - y2[0, odd[odd > p]]).abs().amax(-1).min() > 1e-6
    assert (y[0, later_even] - y2[0, later_even]).abs().amax(-1).min() > 1e-6


def test_sequences_in_a_batch_do_not_interact():
    layer = make()
    x = torch.randn(3, 15, D, dtype=F64)
    x2 = x.clone()
    x2[1] += torch.randn(15, D, dtype=F64)
    y, _ = layer(x)
    y2, _ = layer(x2)
    # routing of sequence 1 changes the packed layout, so equality is up to float64 rounding
    torch.testing.assert_close(y[[0, 2]], y2[[0, 2]], atol=1e-13, rtol=1e-12)
    assert (y[1] - y2[1]).abs().max() > 1e-3


@pytest.mark.parametrize(("router", "weights"), ROUTER_VARIANTS)
def test_left_padded_batch_equals_unpadded_examples(router, weights):
    layer = make(router=router, capacity_factor=1.0, router_weights=weights)
    lengths = [13, 7, 10]
    T = max(lengths)
    x = torch.randn(len(lengths), T, D, dtype=F64)
    ids = ids_for(len(lengths), T)
    mask = torch.zeros(len(lengths), T, dtype=torch.bool)
    for b, L in enumerate(lengths):
        mask[b, T - L:] = True
    y, _ = layer(x, attention_mask=mask, token_ids=ids)
    for b, L in enumerate(lengths):
        y_b, _ = layer(x[b : b + 1, T - L:], token_ids=ids[b : b + 1, T - L:])
        torch.testing.assert_close(y[b, T - L:], y_b[0], atol=1e-12, rtol=1e-10)
        assert torch.all(y[b, : T - L] == 0)


@pytest.mark.parametrize(("shared", "conv"), [(True, True), (False, False)])
@pytest.mark.parametrize(("router", "weights"), ROUTER_VARIANTS)
@pytest.mark.parametrize("rule", rule_names())
def test_step_by_step_decoding_equals_forward(rule, router, weights, shared, conv):
    layer = make(rule, router, shared=shared, conv=conv, router_weights=weights,
                 rule_options={"mini_batch": 4} if rule in ("titans", "ttt") else {})
    T, P = 14, 5
    x = torch.randn(2, T, D, dtype=F64)
    ids = ids_for(2, T)
    y_full, _ = layer(x, token_ids=ids)
    for prefix in (0, P):  # from an empty cache, and after a prefill
        if prefix:
            _, aux = layer(x[:, :prefix], token_ids=ids[:, :prefix], use_cache=True)
            cache = aux.cache
        else:
            cache = layer.init_cache(2, dtype=F64)
        ys = []
        for t in range(prefix, T):
            y_t, cache = layer.step(x[:, t], cache, token_ids=ids[:, t])
            ys.append(y_t)
        torch.testing.assert_close(torch.stack(ys, 1), y_full[:, prefix:], atol=1e-11, rtol=1e-9)


def test_capacity_limits_each_memory_and_counts_drops():
    layer = make(M=4, k=2, shared=False, capacity_factor=0.5)
    x = torch.randn(2, 32, D, dtype=F64)
    plan = layer.route(x)
    cap = -(-0.5 * 32 * 2 // 4)  # ceil(cf * T * k / M) = 8
    for b in range(2):
        counts = torch.bincount(plan.indices[b][plan.kept[b]], minlength=4)
        assert counts.max() <= cap
    n_drop = int((~plan.kept).sum())
    assert plan.dropped == n_drop > 0
    _, aux = layer(x)
    assert aux.stats.dropped_slots == n_drop
    # weights renormalised over the kept slots of each token
    w = plan.weights.sum(-1)
    some = plan.kept.any(-1)
    torch.testing.assert_close(w[some], torch.ones_like(w[some]))
    assert torch.all(w[~some] == 0)


def test_layer_gradients_match_finite_differences():
    layer = make(M=3, k=2, shared=True)
    x = torch.randn(1, 9, D, dtype=F64, requires_grad=True)
    names = ["router.proj.weight", "memories.1.k_proj.weight", "memories.0.gates.beta.proj.bias", "q_conv.weight"]
    params = {n: p.detach().clone().requires_grad_() for n, p in layer.named_parameters() if n in names}
    assert len(params) == len(names)

    def f(x, *ps):
        y, aux = torch.func.functional_call(layer, dict(zip(params, ps)), (x,))
        return y, aux.aux_loss

    assert torch.autograd.gradcheck(f, (x, *params.values()), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("rule", ["lightning", "hgrn2", "ttt"])
def test_every_parameter_the_rule_reads_gets_a_gradient(rule):
    """Forward and backward of a layer; every parameter gets a gradient but, for hgrn2 (whose key is
    1 - its forget gate), the memories' k projections and k convolutions, which it does not read."""
    layer = make(rule).train()
    y, aux = layer(torch.randn(2, 12, D, dtype=F64))
    (y.square().sum() + aux.aux_loss).backward()
    for name, p in layer.named_parameters():
        unread = rule == "hgrn2" and (".k_proj." in name or ".k_conv." in name)
        assert (p.grad is None) == unread, name
        if not unread:
            assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_aux_loss_reaches_the_router():
    layer = make().train()
    x = torch.randn(2, 12, D, dtype=F64)
    _, aux = layer(x)
    aux.aux_loss.backward()
    assert layer.router.proj.weight.grad.abs().sum() > 0


def test_bad_configs_raise_config_error():
    base = MoMConfig(hidden_size=32, num_heads=4)
    cases = [
        (dict(topk=5), r"topk=5 is invalid: must be <= num_memories=4"),
        (dict(rule="mamba3"), r"rule='mamba3' is invalid: valid rules: deltanet, .*titans"),
        (dict(router="expert_choice"), r"router='expert_choice' is invalid: valid routers: dense, hash"),
        (dict(num_heads=5), r"num_heads=5 is invalid: hidden_size=32 must be divisible by num_heads"),
        (dict(head_dim=6, expand_v=0.75), r"expand_v=0.75 is invalid: head_dim \* expand_v = 6 \* 0.75"),
        (dict(capacity_factor=0.0), r"capacity_factor=0.0 is invalid: must be None or > 0"),
        (dict(capacity_factor=-1.0), r"capacity_factor=-1.0 is invalid"),
        (dict(router="dense", topk=2), r"topk=2 is invalid: router 'dense' .* set topk=4"),
        (dict(rule="titans", rule_options={"minibatch": 8}), r"rule_options=.*unknown: \['minibatch'\]"),
        (dict(rule="titans", rule_options={"mini_batch": 0}), r"mini_batch must be a positive int"),
        (dict(num_memories=0), r"num_memories=0 is invalid: must be a positive int"),
        (dict(impl="cuda"), r"impl='cuda' is invalid"),
        (dict(router_weights="softmax"), r"router_weights='softmax' is invalid: one of renormalized, unnormalized"),
        (dict(router="round_robin", router_weights="unnormalized"),
         r"router_weights='unnormalized' is invalid: router 'round_robin' is not learned .*: only renormalized"),
    ]
    for change, msg in cases:
        with pytest.raises(ConfigError, match=msg):
            MoMLayer(dataclasses.replace(base, **change))
    assert issubclass(ConfigError, ValueError)
    layer = MoMLayer(dataclasses.replace(base, router="hash"))
    with pytest.raises(ConfigError, match=r"router='hash' needs token_ids"):
        layer(torch.randn(1, 4, 32))


def _clone_cache(cache):
    return dataclasses.replace(cache, **{f.name: getattr(cache, f.name).clone() for f in dataclasses.fields(cache)})


def test_step_is_one_batched_rule_call_over_the_selected_memories(monkeypatch):
    layer = make(M=4, k=2, shared=True)
    B = 3
    calls = []
    step = layer.rule.step
    monkeypatch.setattr(layer.rule, "step", lambda q, *a, **kw: calls.append(q.shape[0]) or step(q, *a, **kw))
    for mem in layer.all_memories:  # the per-memory modules are not run: their weights are stacked
        for mod in (mem.k_proj, mem.v_proj, mem.gates, mem.k_conv, mem.v_conv):
            mod.register_forward_pre_hook(lambda *_: pytest.fail("a per-memory module ran during step"))
    cache = layer.init_cache(B, dtype=F64)
    with torch.no_grad():
        layer.step(torch.randn(B, D, dtype=F64), cache)
    assert calls == [B * 3]  # top-2 + shared, for every sequence, in one call


def test_step_sees_parameter_changes_and_stays_differentiable():
    import copy

    layer = make(M=3, k=2, shared=True)
    x = torch.randn(2, 6, D, dtype=F64)
    cache = layer.init_cache(2, dtype=F64)
    with torch.no_grad():
        for t in range(5):
            layer.step(x[:, t], cache)  # stacks the decoding weights once
    before = _clone_cache(cache)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(x)[0].square().sum().backward()
    opt.step()  # in-place updates of every parameter
    for edit in ("optimizer", "data"):
        if edit == "data":  # through .data (no version counter): seen by the next new cache
            layer.memories[1].k_proj.weight.data.mul_(-1.0)
            layer.init_cache(1)
        fresh = copy.deepcopy(layer)
        fresh._stacked_memo = None
        with torch.no_grad():
            y, _ = layer.step(x[:, 5], _clone_cache(before))
            y_ref, _ = fresh.step(x[:, 5], _clone_cache(before))
        torch.testing.assert_close(y, y_ref, atol=0, rtol=0, msg=edit)
    # with gradients, the step's parameter gradients are the full forward's
    w = layer.memories[0].gates.beta.proj.weight
    ys = []
    cache = layer.init_cache(2, dtype=F64)
    for t in range(6):
        y_t, cache = layer.step(x[:, t], cache)
        ys.append(y_t)
    g_step, = torch.autograd.grad(torch.stack(ys, 1).square().sum(), w)
    g_full, = torch.autograd.grad(layer(x)[0].square().sum(), w)
    assert g_full.abs().sum() > 0
    torch.testing.assert_close(g_step, g_full, atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("layer_cls", [MoMLayer, SingleMemoryLayer])
@pytest.mark.parametrize(("shape", "message"), [
    ((2, 5, D + 1), rf"x must have shape \[B, T, D\] with D = hidden_size = {D}, got \[2, 5, {D + 1}\]"),
    ((5, D), r"got a 2-D tensor of shape \[5, 16\] \(one sequence: x\[None\]\)"),
    ((2, 0, D), r"x must hold at least one token \(T >= 1\), got shape \[2, 0, 16\]"),
], ids=["hidden_size", "2-D", "T=0"])
def test_forward_names_a_wrong_input_shape(layer_cls, shape, message):
    layer = layer_cls(make(M=1, k=1, shared=False).cfg).double()
    with pytest.raises(ValueError, match=rf"^{layer_cls.__name__}.forward: .*{message}"):
        layer(torch.randn(*shape, dtype=F64))
    with pytest.raises(ValueError, match=r"attention_mask must have shape \[B, T\] = \[2, 5\], got \[2, 4\]"):
        layer(torch.randn(2, 5, D, dtype=F64), attention_mask=torch.ones(2, 4, dtype=torch.bool))


def test_fused_layer_ops_run_only_where_the_rules_kernels_run(monkeypatch):
    """The layers' fused Triton ops follow the rule's kernels: never for float64 (the kernels refuse it)."""
    import importlib.util
    from types import SimpleNamespace

    from momkit.layers.mom import fused_ops
    from momkit.rules import get_rule

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    rule = get_rule("gated_deltanet")
    on_cuda = {dt: SimpleNamespace(is_cuda=True, dtype=dt, device="cuda") for dt in (F64, torch.bfloat16)}
    assert not fused_ops(rule, "auto", on_cuda[F64])
    assert fused_ops(rule, "auto", on_cuda[torch.bfloat16]) == (importlib.util.find_spec("triton") is not None)
    assert not fused_ops(rule, "chunked", on_cuda[torch.bfloat16])
    assert not fused_ops(rule, "auto", torch.zeros(1))
    assert fused_ops(rule, "triton", torch.zeros(1))
