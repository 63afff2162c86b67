"""Routers, dispatch / combine, the load-balancing loss and telemetry."""

from __future__ import annotations

import pytest
import torch

from momkit import MoMConfig, MoMLayer
from momkit.routing import (
    BalanceStats,
    Dispatch,
    RoutingPlan,
    RoutingStats,
    get_router,
    load_balancing_loss,
    router_names,
    z_loss,
)

D, M = 12, 4


def _plan(router: str, B=3, T=17, k=2, capacity=None, padded=True, seed=0, weights="renormalized"):
    torch.manual_seed(seed)
    k = M if router == "dense" else k
    layer = MoMLayer(MoMConfig(hidden_size=D, num_heads=2, num_memories=M, topk=k, router=router,
                               capacity_factor=capacity, router_weights=weights)).double()
    x = torch.randn(B, T, D, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.bool)
    if padded:
        mask[1, :6] = False
    ids = torch.randint(0, 500, (B, T))
    return layer, x, mask, layer.route(x, mask, ids), ids


@pytest.mark.parametrize("capacity", [None, 0.6])
@pytest.mark.parametrize("router", router_names())
def test_dispatch_then_combine_with_identity_memories_returns_the_input(router, capacity):
    layer, x, mask, plan, _ = _plan(router, capacity=capacity)
    for shared in (False, True):
        layer.cfg.shared_memory = shared
        if shared:
            layer.shared = layer.memories[0]
        disp = Dispatch.build(*layer._slots(plan, mask), M + shared)
        y = disp.combine(disp.gather(x))
        kept_weight = plan.weights.sum(-1, keepdim=True) + shared * mask[..., None]
        torch.testing.assert_close(y, x * kept_weight)
        tokens_with_a_slot = plan.kept.any(-1)
        torch.testing.assert_close(plan.weights.sum(-1)[tokens_with_a_slot],
                                   torch.ones(int(tokens_with_a_slot.sum()), dtype=torch.float64))
        assert torch.all(y[~mask] == 0)
        # rows sorted by (memory, sequence), time order kept inside a segment
        seg = disp.segment
        assert torch.all(seg[1:] >= seg[:-1])
        t = disp.token % x.shape[1]
        same = seg[1:] == seg[:-1]
        assert torch.all(t[1:][same] > t[:-1][same])


@pytest.mark.parametrize("capacity", [None, 0.6])
def test_dispatch_gather_gradient_sums_each_tokens_rows(capacity):
    """The gather's backward (through the slot grid, no scatter-add) equals plain indexing's."""
    layer, x, mask, plan, _ = _plan("topk_softmax", capacity=capacity, padded=True)
    disp = Dispatch.build(*layer._slots(plan, mask), M + 1)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    g = torch.randn(disp.num_rows, x.shape[-1], dtype=x.dtype)
    rows = disp.gather(x1)
    (rows * g).sum().backward()
    (x2.reshape(-1, x.shape[-1])[disp.token] * g).sum().backward()
    assert torch.equal(rows, x.reshape(-1, x.shape[-1])[disp.token])
    torch.testing.assert_close(x1.grad, x2.grad)


def test_load_balancing_loss_on_a_hand_made_routing():
    # 4 tokens, 3 memories, top-2
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6], [0.7, 0.2, 0.1]])
    indices = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 1]])
    plan = RoutingPlan(indices[None], torch.ones(1, 4, 2), torch.ones(1, 4, 2, dtype=torch.bool), 3, probs[None])
    stats = BalanceStats.from_plan(plan, torch.ones(1, 4, dtype=torch.bool))
    f = torch.tensor([3, 3, 2]) / 4  # slots per memory / tokens
    P = probs.mean(0)
    expect = 3 * (f * P).sum()
    torch.testing.assert_close(load_balancing_loss([stats]), expect)
    # global over two layers = the same formula on the tokens of both
    stats2 = BalanceStats.from_plan(plan, torch.tensor([[True, True, False, False]]))
    f2 = (torch.tensor([3, 3, 2]) + torch.tensor([1, 2, 1])) / 6
    P2 = (probs.sum(0) + probs[:2].sum(0)) / 6
    torch.testing.assert_close(load_balancing_loss([stats, stats2]), 3 * (f2 * P2).sum())


def test_z_loss_is_mean_squared_logsumexp():
    logits = torch.randn(2, 5, 4)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 0] = False
    torch.testing.assert_close(z_loss(logits, mask), (torch.logsumexp(logits, -1)[mask] ** 2).mean())


def test_topk_sigmoid_bias_balancing_reduces_imbalance():
    torch.manual_seed(0)
    router = get_router("topk_sigmoid")(D, M, 1, bias_update_rate=0.01).train()
    with torch.no_grad():
        router.proj.weight.normal_(0, 0.3)
        router.proj.weight[0] += 0.4  # a deliberately skewed router: memory 0 wins almost every token
    held_out = torch.randn(64, 32, D, generator=torch.Generator().manual_seed(5)).abs()
    mask = torch.ones(64, 32, dtype=torch.bool)
    pos = torch.arange(32).expand(64, 32)

    def imbalance():
        with torch.no_grad():
            stats = RoutingStats.from_plan(router.eval()(held_out, mask, pos, None), mask)
        router.train()
        return stats.max_load - stats.min_load

    before = imbalance()
    gen = torch.Generator().manual_seed(1)
    for _ in range(300):  # "training steps": route a fresh batch, then update the bias
        router(torch.randn(8, 32, D, generator=gen).abs(), mask[:8], pos[:8], None)
        router.update_bias()
    after = imbalance()
    assert before > 0.9 and after < 0.15, (before, after)
    assert router.bias[0] < 0  # the overloaded memory was pushed down


def test_round_robin_and_hash_assignments():
    x = torch.randn(2, 7, D)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, :2] = False
    pos = (mask.long().cumsum(1) - 1).clamp_min(0)
    rr = get_router("round_robin")(D, M, 2)(x, mask, pos, None)
    assert rr.indices[0, :, 0].tolist() == [0, 1, 2, 3, 0, 1, 2]
    assert rr.indices[1, 2:, 0].tolist() == [0, 1, 2, 3, 0]  # counted from the first real token
    assert rr.indices[0, :, 1].tolist() == [1, 2, 3, 0, 1, 2, 3]
    assert torch.all(rr.weights[mask] == 0.5) and torch.all(rr.weights[~mask] == 0)
    ids = torch.tensor([[5, 9, 5, 11, 9, 5, 2], [1, 2, 3, 4, 5, 6, 7]])
    h = get_router("hash")(D, M, 1)(x, mask, pos, ids)
    first = h.indices[0, :, 0]
    assert first[0] == first[2] == first[5] and first[1] == first[4]  # same token -> same memory
    counts = torch.bincount(get_router("hash")(D, M, 1)(x, mask, pos, torch.arange(4000).view(2, 2000)[:, :7])
                            .indices.flatten(), minlength=M)
    assert counts.min() > 0


def test_dense_router_uses_every_memory_with_softmax_weights():
    layer, x, mask, plan, _ = _plan("dense")
    probs = layer.router.logits(x).softmax(-1)
    assert torch.equal(plan.indices[0, 0], torch.arange(M))
    torch.testing.assert_close(plan.weights[mask], probs[mask])


def test_telemetry_reports_load_entropy_and_dead_memories():
    layer, x, mask, plan, _ = _plan("topk_softmax", capacity=0.5)
    stats = RoutingStats.from_plan(plan, mask)
    kept = plan.indices[plan.kept]  # the load counts the slots capacity kept, per memory
    assert stats.load == pytest.approx([int(c) / kept.numel() for c in torch.bincount(kept, minlength=M)], abs=1e-12)
    assert abs(sum(stats.load) - 1) < 1e-9
    assert stats.max_load == max(stats.load) and stats.min_load == min(stats.load)
    assert 0 < stats.entropy <= torch.log(torch.tensor(float(M))) + 1e-9
    assert stats.dropped_slots == plan.dropped > 0
    # a router that never picks memory 3
    with torch.no_grad():
        layer.router.proj.weight[3] = -50.0
    plan = layer.route(x.abs(), mask)
    assert RoutingStats.from_plan(plan, mask).dead_memories >= 1


def test_topk_softmax_noise_changes_selection_only_in_training():
    torch.manual_seed(0)
    router = get_router("topk_softmax")(D, M, 1, noise_std=5.0)
    x = torch.randn(4, 64, D)
    mask = torch.ones(4, 64, dtype=torch.bool)
    pos = torch.arange(64).expand(4, 64)
    router.eval()
    a, b = router(x, mask, pos, None), router(x, mask, pos, None)
    assert torch.equal(a.indices, b.indices)
    router.train()
    c = router(x, mask, pos, None)
    assert (c.indices != a.indices).float().mean() > 0.2
    # weights still come from the clean softmax (renormalised over the noisy selection)
    assert torch.allclose(c.weights, torch.ones_like(c.weights))
    torch.testing.assert_close(c.probs, router.logits(x).softmax(-1))


@pytest.mark.parametrize("router", ["topk_softmax", "topk_sigmoid"])
def test_unnormalized_weights_are_the_routers_own_scores(router):
    layer, x, mask, plan, _ = _plan(router, k=2, weights="unnormalized")
    logits = layer.router.logits(x)
    scores = logits.softmax(-1) if router == "topk_softmax" else logits.sigmoid()
    torch.testing.assert_close(plan.weights[mask], scores.gather(-1, plan.indices)[mask])
    if router == "topk_softmax":  # two of four probabilities: short of 1
        assert torch.all(plan.weights.sum(-1)[mask] < 1 - 1e-6)
    # a capacity limit drops slots and leaves the remaining weights as they were
    capped = plan.apply_capacity(0.6, mask.sum(1))
    assert capped.dropped > 0
    torch.testing.assert_close(capped.weights, plan.weights * capped.kept)


def test_non_learned_routers_refuse_unnormalized_weights():
    for router in ("round_robin", "hash"):
        with pytest.raises(ValueError, match=f"weights='unnormalized' is invalid for router '{router}': one of "
                                             "renormalized$"):
            get_router(router)(D, M, 2, weights="unnormalized")
    with pytest.raises(ValueError, match="weights='softmax' is invalid for router 'topk_softmax': one of "
                                         "renormalized, unnormalized$"):
        get_router("topk_softmax")(D, M, 2, weights="softmax")


@pytest.mark.parametrize("router", ["topk_softmax", "topk_sigmoid"])
def test_top1_router_gets_task_gradient_only_with_unnormalized_weights(router):
    """At top-1 a renormalised weight is exactly 1, so the task loss cannot reach the router; the router's own
    score as the weight (Switch Transformer) passes the gradient. With a shared memory the read is
    ``o_shared + w * o_m``, whose scale the per-head norm keeps."""
    grads = {}
    for weights in ("renormalized", "unnormalized"):
        torch.manual_seed(0)
        layer = MoMLayer(MoMConfig(hidden_size=D, num_heads=2, num_memories=M, topk=1, router=router,
                                   shared_memory=True, aux_loss_scale=0.0, router_weights=weights)).double()
        x = torch.randn(2, 24, D, dtype=torch.float64)
        y, _ = layer(x)
        task_loss = (y - torch.randn_like(y)).square().mean()
        g, = torch.autograd.grad(task_loss, layer.router.proj.weight)
        grads[weights] = g.abs().max().item()
    assert grads["renormalized"] < 1e-12, grads
    assert grads["unnormalized"] > 1e-3, grads


def test_dispatch_orders_rows_as_a_stable_sort_by_segment():
    """The counting sort of the dispatch against its definition, a stable argsort of the segment key
    (memory * B + sequence; dropped slots last, cut off), on random routings with dropped slots, repeated
    memories across slots, one memory, and nothing kept."""
    gen = torch.Generator().manual_seed(0)
    for case in range(60):
        B, T, k = (int(torch.randint(1, n, (), generator=gen)) for n in (5, 40, 4))
        M = int(torch.randint(1, 6, (), generator=gen))
        indices = torch.randint(0, M, (B, T, k), generator=gen)
        kept = torch.rand(B, T, k, generator=gen) < (0.0 if case == 0 else 0.8)
        weights = torch.rand(B, T, k, generator=gen)
        disp = Dispatch.build(indices, weights, kept, M)
        key = torch.where(kept, indices * B + torch.arange(B).view(B, 1, 1), M * B).reshape(-1)
        expected = torch.argsort(key, stable=True)[: int(kept.sum())]
        assert torch.equal(disp.slot, expected), f"case {case}: B={B} T={T} k={k} M={M}"
        assert torch.equal(disp.segment, key[expected])
        assert torch.equal(disp.weight, weights.reshape(-1)[expected])
