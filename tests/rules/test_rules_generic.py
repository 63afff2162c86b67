"""Generic suite: every registered rule (and each of its option variants) against its float64 token loop.

A new rule file is picked up from the registry and gets all of these tests.
"""

from __future__ import annotations

import pytest
import torch

from momkit.rules import get_rule, rule_names
from momkit.testing import random_inputs

F64 = torch.float64
CASES = [(name, opts) for name in rule_names() for opts in get_rule(name).option_variants]
IDS = [name + "".join(f"-{k}{v}" for k, v in opts.items()) for name, opts in CASES]
B, H, K, V = 2, 2, 6, 5  # H > 1, K != V


def _loss_weights(o: torch.Tensor, S: torch.Tensor, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(o.shape, generator=gen, dtype=F64), torch.randn(S.shape, generator=gen, dtype=F64)


def _run(fn, leaves: dict[str, torch.Tensor], wo=None, ws=None, **kw):
    """Run fn on fresh leaf copies; return outputs, final state and gradients of a random projection."""
    xs = {n: x.detach().clone().requires_grad_(True) for n, x in leaves.items() if x is not None}
    q, k, v = xs.pop("q"), xs.pop("k"), xs.pop("v")
    S0 = xs.pop("initial_state", None)
    o, S = fn(q, k, v, initial_state=S0, output_final_state=True, **xs, **kw)
    if wo is None:
        wo, ws = _loss_weights(o, S)
    ((o * wo).sum() + (S * ws).sum()).backward()
    grads = {"q": q.grad, "k": k.grad, "v": v.grad, **{n: x.grad for n, x in xs.items()}}
    if S0 is not None:
        grads["initial_state"] = S0.grad
    return o.detach(), S.detach(), grads, (wo, ws)


def _close(a, b, what, atol=1e-9, rtol=1e-7):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def _unused(rule, grads: dict) -> set[str]:
    """The inputs the rule ignores (k for a rule that makes its key from its gates): no gradient, checked,
    and left out of the comparisons."""
    unused = set() if rule.uses_key else {"k"}
    for n in unused:
        assert grads[n] is None, f"{rule.name} ignores {n}, yet {n} got a gradient"
    return unused


@pytest.mark.parametrize("chunk_size", [16, 64])
@pytest.mark.parametrize("T", [1, 7, 63, 130])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize(("name", "opts"), CASES, ids=IDS)
def test_chunked_matches_recurrent(name, opts, with_state, T, chunk_size):
    rule = get_rule(name)
    q, k, v, gates = random_inputs(rule, B, T, H, K, V, F64, seed=T + chunk_size)
    leaves = {"q": q, "k": k, "v": v, **gates}
    if with_state:
        leaves["initial_state"] = torch.randn(rule.state_shape(B, H, K, V), dtype=F64)
    o_ref, S_ref, g_ref, w = _run(rule.recurrent, leaves, **opts)
    o, S, g, _ = _run(rule.chunked, leaves, *w, chunk_size=chunk_size, **opts)
    assert o.dtype == F64 and S.dtype == F64
    _close(o, o_ref, "output")
    _close(S, S_ref, "final state")
    assert set(g) == set(g_ref)
    unused = _unused(rule, g) | _unused(rule, g_ref)
    for n in set(g_ref) - unused:
        assert g[n] is not None, f"no gradient for {n}"
        _close(g[n], g_ref[n], f"gradient of {n}")


@pytest.mark.parametrize("regime", ["typical", "strong_decay", "saturated"])
@pytest.mark.parametrize(("name", "opts"), CASES, ids=IDS)
def test_float32_chunked_is_as_accurate_as_the_float32_loop(name, opts, regime):
    """In float32 the chunked path (which takes float32 shortcuts where they are exact to rounding,
    and float64 where they are not) is within 2x the float32 token loop's own error against float64,
    plus 16 units of roundoff of the largest reference value; outputs, final state and gradients.

    One measured exception: under strong decay the gradient of a decay gate comes from a reverse
    cumulative sum over the chunk of terms that nearly cancel (the loop has no such sum), which costs
    about 2e-5 of max |dg| in float32 (with or without the float32 shortcuts); it is held to 1e-4."""
    rule = get_rule(name)
    q, k, v, gates = random_inputs(rule, B, 150, H, 16, 12, F64, seed=11, regime=regime)
    leaves = {"q": q, "k": k, "v": v, **gates, "initial_state": torch.randn(rule.state_shape(B, H, 16, 12),
                                                                            dtype=F64)}
    o64, S64, g64, w = _run(rule.recurrent, leaves, **opts)
    f32 = {n: x.float() for n, x in leaves.items()}
    w32 = tuple(x.float() for x in w)
    lows = _run(rule.recurrent, f32, *w32, **opts)
    gots = _run(rule.chunked, f32, *w32, chunk_size=64, **opts)
    refs = (o64, S64, g64)
    used = [n for n in g64 if n not in _unused(rule, g64) | _unused(rule, gots[2])]
    for what, got, low, ref in [("output", gots[0], lows[0], refs[0]), ("final state", gots[1], lows[1], refs[1]),
                                *[(f"gradient of {n}", gots[2][n], lows[2][n], g64[n]) for n in used]]:
        assert got.dtype == torch.float32 and torch.isfinite(got).all(), what
        err = (got.double() - ref).abs().max().item()
        low_err = (low.double() - ref).abs().max().item()
        atol = 16 * 2.0**-24 * ref.abs().max().item()
        if regime == "strong_decay" and what in ("gradient of g", "gradient of dt"):
            atol = 1e-4 * ref.abs().max().item()
        assert err <= 2 * low_err + atol, f"{what}: {err:.3e} > 2 * {low_err:.3e} + {atol:.3e}"


@pytest.mark.parametrize(("name", "opts"), CASES, ids=IDS)
def test_step_matches_recurrent(name, opts):
    rule = get_rule(name)
    T = 37
    q, k, v, gates = random_inputs(rule, B, T, H, K, V, F64, seed=3)
    S = torch.randn(rule.state_shape(B, H, K, V), dtype=F64)
    o_ref, S_ref = rule.recurrent(q, k, v, initial_state=S, output_final_state=True, **gates, **opts)
    outs = []
    for t in range(T):
        o_t, S = rule.step(q[:, t], k[:, t], v[:, t], S, position=t, **{n: x[:, t] for n, x in gates.items()}, **opts)
        outs.append(o_t)
    _close(torch.stack(outs, 1), o_ref, "step outputs")
    _close(S, S_ref, "step final state")


@pytest.mark.parametrize(("name", "opts"), CASES, ids=IDS)
def test_step_into_is_step_on_the_selected_states_written_back(name, opts):
    """``step_into`` on rows of a state buffer: the kept rows' slots end as ``step`` leaves their states, the
    slot of the row not kept and the slots nobody owns do not change, and the outputs are ``step``'s."""
    rule = get_rule(name)
    q, k, v, gates = random_inputs(rule, 3, 1, H, K, V, F64, seed=5)
    gates = {n: x[:, 0] for n, x in gates.items()}
    states = torch.randn(rule.state_shape(5, H, K, V), dtype=F64)
    original = states.clone()
    slots, keep = torch.tensor([4, 0, 2]), torch.tensor([True, False, True])
    o = rule.step_into(q[:, 0], k[:, 0], v[:, 0], states, slots, keep, position=torch.tensor([3, 0, 7]), **gates,
                       **opts)
    o_ref, S_ref = rule.step(q[:, 0], k[:, 0], v[:, 0], original[slots], position=torch.tensor([3, 0, 7]), **gates,
                             **opts)
    torch.testing.assert_close(o, o_ref, rtol=0, atol=0)
    torch.testing.assert_close(states[[4, 2]], S_ref[[0, 2]], rtol=0, atol=0)
    assert torch.equal(states[[0, 1, 3]], original[[0, 1, 3]])
    with pytest.raises(ValueError, match=r"slots and keep must have shape \[3\]"):
        rule.step_into(q[:, 0], k[:, 0], v[:, 0], states, slots[:2], keep, **gates, **opts)


@pytest.mark.parametrize("chunk_size", [16, 64])
@pytest.mark.parametrize(("name", "opts"), CASES, ids=IDS)
def test_packed_segments_match_separate_runs(name, opts, chunk_size):
    rule = get_rule(name)
    C = chunk_size
    lengths = [1, 2, C - 1, 0, C + 1, 3 * C + 5]
    T = sum(lengths)
    q, k, v, gates = random_inputs(rule, 1, T, H, K, V, F64, seed=11)
    S0 = torch.randn(rule.state_shape(len(lengths), H, K, V), dtype=F64)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64)
    leaves = {"q": q, "k": k, "v": v, **gates, "initial_state": S0}
    o, S, g, w = _run(rule.chunked, leaves, chunk_size=C, cu_seqlens=cu, **opts)
    inputs = [n for n in ("q", "k", "v", *gates) if n not in _unused(rule, g)]
    # reference: every segment alone through the token loop, same loss weights
    wo, ws = w
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        if a == b:
            _close(S[i], S0[i], f"segment {i} (empty) final state")
            assert torch.all(g["initial_state"][i] == ws[i])
            continue
        seg = {n: x[:, a:b] for n, x in leaves.items() if n != "initial_state"}
        seg["initial_state"] = S0[i : i + 1]
        o_i, S_i, g_i, _ = _run(rule.recurrent, seg, wo[:, a:b], ws[i : i + 1], **opts)
        _close(o[:, a:b], o_i, f"segment {i} output")
        _close(S[i : i + 1], S_i, f"segment {i} final state")
        for n in inputs:
            _close(g[n][:, a:b], g_i[n], f"segment {i} gradient of {n}")
        _close(g["initial_state"][i : i + 1], g_i["initial_state"], f"segment {i} gradient of initial_state")


@pytest.mark.parametrize("impl", ["recurrent", "chunked"])
def test_packed_offsets_as_a_tuple(impl):
    """cu_seqlens as host ints (what the MoM dispatch passes, sparing a device sync) gives the same
    result as the tensor; a malformed tuple is refused with the reason."""
    rule = get_rule("gated_deltanet")
    q, k, v, gates = random_inputs(rule, 1, 40, H, K, V, F64, seed=5)
    cu = (0, 3, 3, 40)
    o_t, S_t = rule.forward(q, k, v, impl=impl, cu_seqlens=torch.tensor(cu), output_final_state=True, **gates)
    o_h, S_h = rule.forward(q, k, v, impl=impl, cu_seqlens=cu, output_final_state=True, **gates)
    assert torch.equal(o_t, o_h) and torch.equal(S_t, S_h)
    for bad, match in (((0, 3, 41), "end at T=40"), ((0, 30, 3, 40), "non-decreasing"), ((0, 3.0, 40), "ints")):
        with pytest.raises(ValueError, match=match):
            rule.forward(q, k, v, impl=impl, cu_seqlens=bad, **gates)


@pytest.mark.parametrize(("name", "opts"), CASES, ids=IDS)
def test_chained_calls_equal_one_pass(name, opts):
    """Processing in pieces while carrying the state equals one pass (pieces of whole mini-batches)."""
    rule = get_rule(name)
    unit = opts.get("mini_batch", rule.options.get("mini_batch", 1))
    pieces = [3 * unit, 5 * unit, 2 * unit]
    q, k, v, gates = random_inputs(rule, B, sum(pieces), H, K, V, F64, seed=5)
    o_ref, S_ref = rule.chunked(q, k, v, output_final_state=True, chunk_size=16, **gates, **opts)
    S, outs, t = None, [], 0
    for n in pieces:
        sl = slice(t, t + n)
        o, S = rule.chunked(q[:, sl], k[:, sl], v[:, sl], initial_state=S, output_final_state=True,
                            chunk_size=16, **{g: x[:, sl] for g, x in gates.items()}, **opts)
        outs.append(o)
        t += n
    _close(torch.cat(outs, 1), o_ref, "chained outputs")
    _close(S, S_ref, "chained final state")


@pytest.mark.parametrize(("name", "opts"), CASES, ids=IDS)
@pytest.mark.parametrize("regime", ["strong_decay", "saturated"])
def test_long_sequences_stay_finite(name, opts, regime):
    rule = get_rule(name)
    q, k, v, gates = random_inputs(rule, 1, 4096, H, 16, 16, torch.float32, seed=7, regime=regime)
    o, S = rule.chunked(q, k, v, output_final_state=True, **gates, **opts)
    assert torch.isfinite(o).all() and torch.isfinite(S).all()


@pytest.mark.parametrize(("name", "opts"), CASES, ids=IDS)
def test_bf16_inputs_keep_float32_state(name, opts):
    rule = get_rule(name)
    q, k, v, gates = random_inputs(rule, B, 100, H, 16, 16, F64, seed=9)
    o_ref, S_ref = rule.recurrent(q, k, v, output_final_state=True, **gates, **opts)
    lo = [x.to(torch.bfloat16) for x in (q, k, v)]
    g_lo = {n: x.to(torch.bfloat16) for n, x in gates.items()}
    for fn in (rule.chunked, rule.recurrent):
        o, S = fn(*lo, output_final_state=True, **g_lo, **opts)
        assert o.dtype == torch.bfloat16 and S.dtype == torch.float32
        # bf16 inputs carry ~3 significant digits
        torch.testing.assert_close(o.double(), o_ref, atol=5e-2, rtol=5e-2)
        torch.testing.assert_close(S.double(), S_ref, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize(("name", "opts"), CASES, ids=IDS)
def test_forward_dispatch(name, opts):
    rule = get_rule(name)
    q, k, v, gates = random_inputs(rule, B, 20, H, K, V, F64, seed=2)
    o_auto, _ = rule.forward(q, k, v, impl="auto", **gates, **opts)
    o_chk, _ = rule.chunked(q, k, v, **gates, **opts)
    o_rec, _ = rule.forward(q, k, v, impl="recurrent", **gates, **opts)
    assert torch.equal(o_auto, o_chk)  # auto on CPU tensors is the chunked path
    _close(o_rec, o_chk, "recurrent vs chunked")
    with pytest.raises(ValueError, match="impl must be one of"):
        rule.forward(q, k, v, impl="fast", **gates, **opts)


@pytest.mark.parametrize("name", rule_names())
def test_gate_module_shapes_and_domains(name):
    rule = get_rule(name)
    D, Hh, Kk = 32, 4, 8
    x = torch.randn(2, 11, D)
    gates = rule.gate_module(D, Hh, Kk)(x)
    assert set(gates) == set(rule.gate_names)
    for spec in rule.gates:
        g = gates[spec.name]
        assert g.shape == ((2, 11, Hh, Kk) if spec.per_channel else (2, 11, Hh))
        assert torch.isfinite(g).all()
        if spec.domain == "log_decay":
            assert (g <= 0).all()
        elif spec.domain == "unit":
            assert ((g >= 0) & (g <= 1)).all()
        else:
            assert (g >= 0).all()
    q, k = torch.randn(2, 11, Hh, Kk), torch.randn(2, 11, Hh, Kk)
    o, _ = rule.chunked(*rule.prepare_qk(q, k), torch.randn(2, 11, Hh, 5), **gates)
    assert torch.isfinite(o).all()


@pytest.mark.parametrize("name", rule_names())
def test_gate_modules_forward_stacked_equals_each_module(name):
    """The gates of M memories at once (decoding) are each memory's own gates."""
    from momkit.rules.gates import stack_parameters

    torch.manual_seed(0)
    D, M, N = 12, 3, 5
    mods = [get_rule(name).gate_module(D, H, K).double() for _ in range(M)]
    with torch.no_grad():  # memories that differ in every parameter and buffer, biases included
        for mod in mods:
            for t in [*mod.parameters(), *mod.buffers()]:
                t.add_(0.3 * torch.randn_like(t))
    x = torch.randn(N, D, dtype=F64)
    stacked = mods[0].forward_stacked(stack_parameters(mods), x)
    each = [mod(x[:, None]) for mod in mods]  # [N, 1, H(, K)] per memory
    assert set(stacked) == set(each[0]) == set(get_rule(name).gate_names)
    for n, g in stacked.items():
        _close(g, torch.stack([e[n][:, 0] for e in each], 1), f"gate {n}", atol=1e-14, rtol=1e-13)
