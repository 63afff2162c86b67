"""Every rule fla-core has a reference for, against that reference: momkit's ``recurrent`` and ``chunked``
paths (float64) against fla 0.6.0's naive torch functions (which compute in float32), with an initial
state and the final state, on random inputs. fla is a peer here, not ground truth: agreement to float32
precision says both implement the same recurrence."""

from __future__ import annotations

import pytest
import torch

from momkit.rules import get_rule

B, T, H, K, V = 2, 37, 3, 8, 6
F64 = torch.float64


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, T, H, K, generator=g), torch.randn(B, T, H, K, generator=g)
    q, k = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)  # the delta rules' layers do this
    v = torch.randn(B, T, H, V, generator=g)
    S0 = torch.randn(B, H, K, V, generator=g) * 0.5
    head_decay = -torch.rand(B, T, H, generator=g) * 0.5  # log decays <= 0
    chan_decay = -torch.rand(B, T, H, K, generator=g) * 0.5
    unit = torch.rand(B, T, H, generator=g)
    return q, k, v, S0, head_decay, chan_decay, unit


def _ours(rule, q, k, v, S0, **gates):
    r = get_rule(rule)
    outs = []
    for path in (r.recurrent, r.chunked):
        o, S = path(*(x.to(F64) for x in (q, k, v)), initial_state=None if S0 is None else S0.to(F64),
                    output_final_state=True, **{n: x.to(F64) for n, x in gates.items()})
        outs.append((o, S))
    return outs


def _fla(name):
    from momkit.interop import _fla as load

    load()  # imports fla (with its transformers) the safe way first
    import importlib

    return importlib.import_module(f"fla.ops.{name}.naive")


def _check(ours, o_ref, S_ref=None):
    for o, S in ours:
        assert _rel(o, o_ref) < 1e-5, "output"
        if S_ref is not None:
            assert _rel(S, S_ref) < 1e-5, "final state"


@pytest.fixture
def fla_naive(fla_cpu):
    return _fla


def test_linear_attn(fla_naive):
    q, k, v, S0, *_ = _inputs(0)
    o, S = fla_naive("linear_attn").naive_recurrent_linear_attn(q, k, v, initial_state=S0, output_final_state=True)
    _check(_ours("linear_attn", q, k, v, S0), o, S)


def test_retnet_is_fla_retention(fla_naive):
    q, k, v, *_ = _inputs(1)
    o = fla_naive("retention").naive_retention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    g = torch.log1p(-(2.0 ** (-5.0 - torch.arange(H, dtype=torch.float)))).expand(B, T, H)  # retnet's decays
    _check(_ours("retnet", q, k, v, None, g=g), o)


def test_gla(fla_naive):
    q, k, v, S0, _, gk, _ = _inputs(2)
    o, S = fla_naive("gla").naive_recurrent_gla(q, k, v, gk, initial_state=S0, output_final_state=True)
    _check(_ours("gla", q, k, v, S0, g=gk), o, S)


def test_mamba2_is_simple_gla_with_scaled_keys(fla_naive):
    q, k, v, S0, g, _, u = _inputs(3)
    dt = u * 2
    o, S = fla_naive("simple_gla").naive_recurrent_simple_gla(q, k * dt[..., None], v, g, initial_state=S0,
                                                              output_final_state=True)
    _check(_ours("mamba2", q, k, v, S0, g=g, dt=dt), o, S)


def test_lightning_is_simple_gla_with_its_constant_decays(fla_naive):
    q, k, v, S0, *_ = _inputs(4)
    g = get_rule("lightning").gate_module(8, H, K)(torch.zeros(B, T, 8))["g"]
    o, S = fla_naive("simple_gla").naive_recurrent_simple_gla(q, k, v, g, initial_state=S0, output_final_state=True)
    _check(_ours("lightning", q, k, v, S0, g=g), o, S)


def test_hgrn2_is_gla_with_its_forget_gate_as_key(fla_naive):
    q, k, v, S0, _, gk, _ = _inputs(5)
    o, S = fla_naive("gla").naive_recurrent_gla(q, 1 - gk.exp(), v, gk, initial_state=S0, output_final_state=True)
    _check(_ours("hgrn2", q, k, v, S0, g=gk), o, S)


def test_deltanet(fla_naive):
    q, k, v, S0, _, _, beta = _inputs(6)
    o, S = fla_naive("delta_rule").delta_rule_recurrence(*(x.transpose(1, 2) for x in (q, k, v, beta)),
                                                          initial_state=S0, output_final_state=True)
    _check(_ours("deltanet", q, k, v, S0, beta=beta), o.transpose(1, 2), S)


def test_gated_deltanet(fla_naive):
    q, k, v, S0, g, _, beta = _inputs(7)
    o, S = fla_naive("gated_delta_rule").naive_recurrent_gated_delta_rule(q, k, v, beta, g, initial_state=S0,
                                                                          output_final_state=True)
    _check(_ours("gated_deltanet", q, k, v, S0, g=g, beta=beta), o, S)

