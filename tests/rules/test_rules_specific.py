"""Identities between rules, gate-module inits, and errors on bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from momkit.rules import Rule, get_rule, register_rule, rule_names
from momkit.rules.gates import DecayGate, GLAGate
from momkit.testing import random_inputs

F64 = torch.float64
B, T, H, K, V = 2, 45, 2, 6, 5


def _both(rule, *args, **kw):
    return [fn(*args, output_final_state=True, chunk_size=16, **kw) if fn == rule.chunked
            else fn(*args, output_final_state=True, **kw) for fn in (rule.recurrent, rule.chunked)]


def _assert_same(a, b):
    for (o1, S1), (o2, S2) in zip(a, b):
        torch.testing.assert_close(o1, o2, atol=1e-10, rtol=1e-9)
        torch.testing.assert_close(S1, S2, atol=1e-10, rtol=1e-9)


def _qkv(seed=0):
    q, k, v, _ = random_inputs(get_rule("deltanet"), B, T, H, K, V, F64, seed=seed)
    return q, k, v


def test_registry_lists_every_rule():
    # the ten rules of the MoM paper's Table 1 (docs/rules.md maps each row to its name)
    assert {"linear_attn", "lightning", "retnet", "gla", "mamba2", "hgrn2", "deltanet", "gated_deltanet", "ttt",
            "titans"} <= set(rule_names())
    with pytest.raises(ValueError, match="unknown rule 'gdn'; valid rules: .*gated_deltanet"):
        get_rule("gdn")
    with pytest.raises(ValueError, match="already registered"):
        class Other(Rule):
            name = "gla"
        register_rule(Other())


def test_gla_with_zero_decay_is_linear_attention():
    q, k, v = _qkv()
    g = torch.zeros(B, T, H, K, dtype=F64)
    _assert_same(_both(get_rule("gla"), q, k, v, g=g), _both(get_rule("linear_attn"), q, k, v))


@pytest.mark.parametrize("per_token", [-0.5, -10.0, -20.0, -45.0, -200.0])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_gla_chunked_under_every_decay_strength(per_token, dtype):
    """GLA's chunked path factorises decays inside 32-token sub-chunks in the input's precision when
    they are mild, in float64 when they are strong (decays below exp(-40) per token are floored: their
    effect is below float64 resolution). Every strength, with channels of no decay mixed in, against
    the float64 token loop: outputs, final state and gradients."""
    rule = get_rule("gla")
    q, k, v = _qkv(3)
    gen = torch.Generator().manual_seed(4)
    g = per_token * (1 + 0.1 * torch.rand(B, T, H, K, generator=gen, dtype=F64))
    g[..., ::3] = 0.0  # some channels keep everything
    S0 = torch.randn(B, H, K, V, generator=gen, dtype=F64)
    w = torch.randn(B, T, H, V, generator=gen, dtype=F64)

    def run(fn, x, **kw):
        leaves = [t.detach().to(x).requires_grad_(True) for t in (q, k, v, g, S0)]
        o, S = fn(*leaves[:3], g=leaves[3], initial_state=leaves[4], output_final_state=True, **kw)
        ((o.double() * w).sum() + S.double().square().sum()).backward()
        return [o, S] + [t.grad for t in leaves]

    ref = run(rule.recurrent, F64)
    got = run(rule.chunked, dtype, chunk_size=64)
    tol = {F64: dict(atol=1e-10, rtol=1e-9), torch.float32: dict(atol=2e-4, rtol=2e-3)}[dtype]
    for name, a, b in zip(["o", "S", "dq", "dk", "dv", "dg", "dS0"], got, ref):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a.double(), b, **tol, msg=lambda m, n=name: f"{n}: {m}")


def test_gated_deltanet_with_zero_decay_is_deltanet():
    q, k, v = _qkv(1)
    beta = torch.rand(B, T, H, dtype=F64)
    g = torch.zeros(B, T, H, dtype=F64)
    _assert_same(_both(get_rule("gated_deltanet"), q, k, v, g=g, beta=beta),
                 _both(get_rule("deltanet"), q, k, v, beta=beta))


def test_mamba2_with_zero_decay_unit_step_is_linear_attention():
    q, k, v = _qkv(2)
    z = torch.zeros(B, T, H, dtype=F64)
    _assert_same(_both(get_rule("mamba2"), q, k, v, g=z, dt=z + 1), _both(get_rule("linear_attn"), q, k, v))


def test_titans_token_level_without_momentum_or_forgetting_is_deltanet():
    q, k, v = _qkv(3)
    theta = torch.rand(B, T, H, dtype=F64)
    z = torch.zeros(B, T, H, dtype=F64)
    titans = _both(get_rule("titans"), q, k, v, theta=theta, alpha=z, eta=z, mini_batch=1)
    delta = _both(get_rule("deltanet"), q, k, v, beta=theta)
    for (o1, S1), (o2, S2) in zip(titans, delta):
        torch.testing.assert_close(o1, o2, atol=1e-10, rtol=1e-9)
        torch.testing.assert_close(S1[:, :, 0], S2, atol=1e-10, rtol=1e-9)  # slot 0 is the memory


def test_titans_mini_batch_uses_the_memory_before_the_batch():
    """Within a mini-batch every gradient is taken at M0: with eta = alpha = 0 the memory after the
    batch is M0 - sum_t theta_t k_t (M0^T k_t - v_t)^T, by hand."""
    rule = get_rule("titans")
    q, k, v = _qkv(4)
    mb = 5
    theta = torch.rand(B, mb, H, dtype=F64)
    z = torch.zeros(B, mb, H, dtype=F64)
    M0 = torch.randn(B, H, K, V, dtype=F64)
    S0 = torch.stack([M0, torch.zeros_like(M0), torch.zeros_like(M0)], 2)
    ks, vs = k[:, :mb], v[:, :mb]
    grad = torch.einsum("bthk,bhkv->bthv", ks, M0) - vs
    expect = M0 - torch.einsum("bth,bthk,bthv->bhkv", theta, ks, grad)
    for fn in (rule.recurrent, rule.chunked):
        _, S = fn(q[:, :mb], ks, vs, initial_state=S0, output_final_state=True, theta=theta, alpha=z, eta=z,
                  mini_batch=mb)
        torch.testing.assert_close(S[:, :, 0], expect)


def test_titans_step_needs_position_for_mini_batches():
    rule = get_rule("titans")
    S = rule.init_state(1, 1, 4, 4)
    x = torch.randn(1, 1, 4)
    g = torch.rand(1, 1)
    with pytest.raises(ValueError, match="needs position"):
        rule.step(x, x, x, S, theta=g, alpha=g, eta=g)
    rule.step(x, x, x, S, theta=g, alpha=g, eta=g, mini_batch=1)


def test_titans_chunk_length_is_a_multiple_of_the_mini_batch():
    rule = get_rule("titans")
    assert rule._chunk_len(64, {"mini_batch": 16}) == 64
    assert rule._chunk_len(64, {"mini_batch": 24}) == 48
    assert rule._chunk_len(16, {"mini_batch": 32}) == 32
    q, k, v, g = random_inputs(rule, 1, 50, 1, 4, 4, F64, seed=0)
    o1, _ = rule.recurrent(q, k, v, **g, mini_batch=24)
    o2, _ = rule.chunked(q, k, v, chunk_size=64, **g, mini_batch=24)
    torch.testing.assert_close(o1, o2)


def test_decay_gate_inits_follow_mamba2():
    torch.manual_seed(0)
    gate = DecayGate(16, 64)
    A = gate.A_log.exp()
    assert A.min() >= 1 and A.max() <= 16
    dt = torch.nn.functional.softplus(gate.dt_bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 1e-1 * 1.001
    assert gate.A_log._no_weight_decay and gate.dt_bias._no_weight_decay


def test_gla_gate_is_logsigmoid_over_16():
    gate = GLAGate(8, 2, 4)
    with torch.no_grad():
        gate.up.weight.zero_()
        gate.up.bias.fill_(0.0)
    g = gate(torch.randn(1, 3, 8))["g"]
    torch.testing.assert_close(g, torch.full((1, 3, 2, 4), math.log(0.5) / 16))


def test_retnet_decays_are_fixed_per_head():
    g = get_rule("retnet").gate_module(8, 3, 4)(torch.randn(2, 5, 8))["g"]
    expect = torch.log(1 - 2.0 ** (-5 - torch.arange(3.0)))
    torch.testing.assert_close(g, expect.expand(2, 5, 3))
    assert not list(get_rule("retnet").gate_module(8, 3, 4).parameters())


def test_lightning_is_retnet_with_lightning_attentions_decays():
    """Decays exp(-2^(-8 (h + 1) / H)) (ALiBi's slopes; H not a power of two: those of the power of two below,
    then every other slope of twice that), not learned; with them the rule is retnet."""
    gates = get_rule("lightning").gate_module(8, 8, 4)
    assert not list(gates.parameters())
    g = gates(torch.randn(2, 5, 8))["g"]
    torch.testing.assert_close(g, (-(2.0 ** (-torch.arange(1.0, 9.0)))).expand(2, 5, 8))
    slopes6 = torch.tensor([2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3])
    torch.testing.assert_close(get_rule("lightning").gate_module(8, 6, 4).g, -slopes6)
    torch.testing.assert_close(get_rule("lightning").gate_module(8, 1, 4).g, torch.tensor([-(2.0**-8)]))
    from momkit.rules.lightning import LightningDecay

    torch.testing.assert_close(LightningDecay(4, depth_scale=0.5).g, -0.5 * 2.0 ** (-2.0 * torch.arange(1.0, 5.0)))
    q, k, v = _qkv(5)
    g = (-(2.0 ** (-8.0 * torch.arange(1.0, H + 1, dtype=F64) / H))).expand(B, T, H)  # log lambda_h
    _assert_same(_both(get_rule("lightning"), q, k, v, g=g), _both(get_rule("retnet"), q, k, v, g=g))
    S = torch.randn(B, H, K, V, dtype=F64)
    o1, S1 = get_rule("lightning").step(q[:, 0], k[:, 0], v[:, 0], S, g=g[:, 0])
    o2, S2 = get_rule("retnet").step(q[:, 0], k[:, 0], v[:, 0], S, g=g[:, 0])
    assert torch.equal(o1, o2) and torch.equal(S1, S2)


def test_hgrn2_is_gla_with_the_key_one_minus_the_forget_gate():
    """hgrn2(q, any k, v, g) = gla(q, 1 - exp(g), v, g): outputs, states, and the gradient of g (which
    reaches it through the decay and the key)."""
    hgrn2, gla = get_rule("hgrn2"), get_rule("gla")
    q, k, v = _qkv(6)
    g = F.logsigmoid(torch.randn(B, T, H, K, dtype=F64, generator=torch.Generator().manual_seed(1)))
    _assert_same(_both(hgrn2, q, k, v, g=g), _both(gla, q, 1 - g.exp(), v, g=g))
    _assert_same(_both(hgrn2, q, torch.randn_like(k), v, g=g), _both(hgrn2, q, k, v, g=g))  # k is ignored
    assert not hgrn2.uses_key and gla.uses_key
    for fn in ("recurrent", "chunked"):
        g1, g2 = g.clone().requires_grad_(), g.clone().requires_grad_()
        getattr(hgrn2, fn)(q, k, v, g=g1)[0].square().sum().backward()
        getattr(gla, fn)(q, 1 - g2.exp(), v, g=g2)[0].square().sum().backward()
        torch.testing.assert_close(g1.grad, g2.grad, atol=1e-10, rtol=1e-9)
    S = torch.randn(B, H, K, V, dtype=F64)
    o1, S1 = hgrn2.step(q[:, 0], k[:, 0], v[:, 0], S, g=g[:, 0])
    o2, S2 = gla.step(q[:, 0], 1 - g[:, 0].exp(), v[:, 0], S, g=g[:, 0])
    torch.testing.assert_close(o1, o2)
    torch.testing.assert_close(S1, S2)
    # what the kernels get: gla's inputs
    k_kernel, gates = hgrn2.kernel_inputs(k.float(), {"g": g.float()})
    torch.testing.assert_close(k_kernel, (1 - g.exp()).float())
    assert set(gates) == {"g"}


def test_hgrn2_gate_is_a_bounded_sigmoid_forget_gate():
    from momkit.rules.hgrn2 import HGRN2Gate

    gate = get_rule("hgrn2").gate_module(8, 2, 4)
    assert isinstance(gate, HGRN2Gate) and gate.lower_bound == 0.0 and gate.proj.bias is None
    x = torch.randn(3, 5, 8)
    torch.testing.assert_close(gate(x)["g"], F.logsigmoid(gate.proj(x)).unflatten(-1, (2, 4)))
    bounded = HGRN2Gate(8, 2, 4, lower_bound=0.3)
    bounded.load_state_dict(gate.state_dict())
    f = bounded(x)["g"].exp()
    torch.testing.assert_close(f, 0.3 + 0.7 * gate.proj(x).sigmoid().unflatten(-1, (2, 4)))
    assert (f >= 0.3).all()
    with pytest.raises(ValueError, match="lower_bound must be in"):
        HGRN2Gate(8, 2, 4, lower_bound=1.0)


@pytest.mark.parametrize("mini_batch", [1, 4, 16])
def test_ttt_is_titans_without_momentum_or_forgetting(mini_batch):
    ttt, titans = get_rule("ttt"), get_rule("titans")
    q, k, v = _qkv(7)
    theta = torch.rand(B, T, H, dtype=F64)
    z = torch.zeros(B, T, H, dtype=F64)
    S0 = torch.randn(ttt.state_shape(B, H, K, V), dtype=F64)
    kw = dict(initial_state=S0, mini_batch=mini_batch)
    _assert_same(_both(ttt, q, k, v, theta=theta, **kw), _both(titans, q, k, v, theta=theta, alpha=z, eta=z, **kw))
    S = S0
    for t in range(7):
        o1, S1 = ttt.step(q[:, t], k[:, t], v[:, t], S, theta=theta[:, t], position=t, mini_batch=mini_batch)
        o2, S2 = titans.step(q[:, t], k[:, t], v[:, t], S, theta=theta[:, t], alpha=z[:, t], eta=z[:, t],
                             position=t, mini_batch=mini_batch)
        torch.testing.assert_close(o1, o2)
        torch.testing.assert_close(S1, S2)
        S = S1
    if mini_batch == 1:  # token-level gradient descent: deltanet with beta = theta
        for (o1, S1), (o2, S2) in zip(_both(ttt, q, k, v, theta=theta, mini_batch=1),
                                      _both(get_rule("deltanet"), q, k, v, beta=theta)):
            torch.testing.assert_close(o1, o2, atol=1e-10, rtol=1e-9)
            torch.testing.assert_close(S1[:, :, 0], S2, atol=1e-10, rtol=1e-9)


def test_ttt_gate_and_options():
    ttt = get_rule("ttt")
    gate = ttt.gate_module(8, 2, 4)
    with torch.no_grad():
        gate.proj.weight.zero_()
    torch.testing.assert_close(gate(torch.randn(1, 3, 8))["theta"], torch.full((1, 3, 2), 0.5))
    assert ttt.gate_names == ("theta",) and ttt.options == {"mini_batch": 16} and ttt.normalize_qk
    _, kernel_gates = ttt.kernel_inputs(torch.zeros(1), {"theta": torch.rand(2, 3)})
    assert set(kernel_gates) == {"theta", "alpha", "eta"}
    assert not kernel_gates["alpha"].any() and not kernel_gates["eta"].any()
    x = torch.randn(1, 1, 4)
    with pytest.raises(ValueError, match="ttt.step with mini_batch > 1 needs position"):
        ttt.step(x, x, x, ttt.init_state(1, 1, 4, 4), theta=torch.rand(1, 1))
    with pytest.raises(ValueError, match="ttt option mini_batch must be a positive int"):
        ttt.chunked(x[:, None], x[:, None], x[:, None], theta=torch.rand(1, 1, 1), mini_batch=0)


# ---------------------------------------------------------------------------------------------- bad input
def _good(name="gated_deltanet", B_=1, T_=8):
    rule = get_rule(name)
    q, k, v, g = random_inputs(rule, B_, T_, 2, 4, 3, torch.float32, seed=0)
    return rule, q, k, v, g


@pytest.mark.parametrize("fn", ["recurrent", "chunked"])
def test_bad_inputs_raise_clear_errors(fn):
    rule, q, k, v, g = _good()
    run = getattr(rule, fn)
    with pytest.raises(ValueError, match=r"k must have the shape of q"):
        run(q, k[..., :3], v, **g)
    with pytest.raises(ValueError, match=r"v must have shape \[B, T, H, V\]"):
        run(q, k, v[:, :5], **g)
    with pytest.raises(ValueError, match=r"q must have shape \[B, T, H, D\]"):
        run(q[0], k, v, **g)
    with pytest.raises(ValueError, match=r"needs gate\(s\) \['beta'\]"):
        run(q, k, v, g=g["g"])
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['gamma'\].*gates are \['g', 'beta'\]"):
        run(q, k, v, **g, gamma=g["g"])
    with pytest.raises(ValueError, match=r"gate 'beta' .* must have shape \[1, 8, 2\], got \(1, 8\)"):
        run(q, k, v, g=g["g"], beta=g["beta"][..., 0])
    with pytest.raises(ValueError, match="k has dtype torch.float64 but q has torch.float32"):
        run(q, k.double(), v, **g)
    with pytest.raises(ValueError, match="must be float16, bfloat16, float32 or float64"):
        run(q.int(), k.int(), v.int(), **g)
    with pytest.raises(ValueError, match="gate 'g' must be a float tensor"):
        run(q, k, v, g=g["g"].int(), beta=g["beta"])
    with pytest.raises(ValueError, match=r"initial_state must have shape \[1, 2, 4, 3\]"):
        run(q, k, v, **g, initial_state=torch.zeros(1, 2, 3, 4))
    with pytest.raises(ValueError, match="scale must be a positive finite number"):
        run(q, k, v, **g, scale=-1.0)
    with pytest.raises(ValueError, match=r"at least one token"):
        run(q[:, :0], k[:, :0], v[:, :0], **{n: x[:, :0] for n, x in g.items()})


@pytest.mark.parametrize("fn", ["recurrent", "chunked"])
def test_bad_cu_seqlens_raise(fn):
    rule, q, k, v, g = _good()
    run = getattr(rule, fn)
    cases = [
        (torch.tensor([0, 3, 8], dtype=torch.int32), "dtype int64"),
        (torch.tensor([1, 3, 8]), "start at 0 and end at T=8"),
        (torch.tensor([0, 3, 7]), "start at 0 and end at T=8"),
        (torch.tensor([0, 5, 3, 8]), "non-decreasing"),
        (torch.tensor([[0, 8]]), "1-D int64 tensor"),
    ]
    for cu, msg in cases:
        with pytest.raises(ValueError, match=msg):
            run(q, k, v, **g, cu_seqlens=cu)
    rule, q, k, v, g = _good(B_=2)
    with pytest.raises(ValueError, match="needs batch size 1, got B=2"):
        run(q, k, v, **g, cu_seqlens=torch.tensor([0, 8]))


def test_bad_chunk_size_and_options_raise():
    rule, q, k, v, g = _good()
    with pytest.raises(ValueError, match="chunk_size must be a positive int, got 0"):
        rule.chunked(q, k, v, **g, chunk_size=0)
    titans, q, k, v, g = _good("titans")
    with pytest.raises(ValueError, match="mini_batch must be a positive int, got 0"):
        titans.chunked(q, k, v, **g, mini_batch=0)


def test_step_shape_errors():
    rule, q, k, v, g = _good()
    S = rule.init_state(1, 2, 4, 3)
    with pytest.raises(ValueError, match=r"step expects q of shape \[B, H, D\]"):
        rule.step(q, k[:, 0], v[:, 0], S, **{n: x[:, 0] for n, x in g.items()})
    with pytest.raises(ValueError, match=r"step: gate 'beta' .* must have shape \[1, 2\]"):
        rule.step(q[:, 0], k[:, 0], v[:, 0], S, g=g["g"][:, 0], beta=g["beta"])
    with pytest.raises(ValueError, match=r"state must have shape \[1, 2, 4, 3\]"):
        rule.step(q[:, 0], k[:, 0], v[:, 0], S[:, :1], **{n: x[:, 0] for n, x in g.items()})


def test_triton_impl_on_cpu_tensors_raises_with_the_reason(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    rule, q, k, v, g = _good()
    with pytest.raises(RuntimeError, match="impl='triton' cannot run for rule 'gated_deltanet': .*need a CUDA"):
        rule.forward(q, k, v, impl="triton", **g)
