"""The official MoM code's parameter sharing and init as layer options (``momkit.layers.official``):
parameter counts, shared gradients, decoding, the init, and config errors."""

from __future__ import annotations

import copy

import pytest
import torch

from momkit import ConfigError, MoMConfig, MoMLayer, SingleMemoryLayer

F64 = torch.float64
D, H, K = 16, 2, 4
OFFICIAL = dict(share_decay=True, share_kv_conv=True, beta_bias=False, single_kv_proj=True,
                shared_uses_routed_proj=True, init="fla")


def make(seed=0, rule="gated_deltanet", M=3, **kw):
    torch.manual_seed(seed)
    cfg = MoMConfig(hidden_size=D, num_heads=H, head_dim=K, expand_v=2, rule=rule, num_memories=M, topk=2,
                    shared_memory=True, chunk_size=8, **kw)
    return MoMLayer(cfg).double()


def count(layer) -> int:
    return sum(p.numel() for p in layer.parameters())


def test_each_option_removes_exactly_the_parameters_it_shares():
    M, W, V = 3, 4, 2 * K
    base = count(make())
    Mp = M + 1  # the shared memory too
    assert base - count(make(share_decay=True)) == (Mp - 1) * 2 * H  # A_log and dt_bias
    assert base - count(make(share_kv_conv=True)) == (Mp - 1) * (H * K + H * V) * W
    assert base - count(make(beta_bias=False)) == Mp * H
    routed = count(make(single_kv_proj=True))
    one_memory = (D * H * K + D * H * V) + (2 * H + D * H) + (D * H + H) + (H * K + H * V) * W
    assert routed - count(make(single_kv_proj=True, shared_uses_routed_proj=True)) == one_memory
    assert count(make(init="fla")) == base


def test_a_shared_parameter_gets_the_sum_of_every_memorys_gradient():
    """The tied layer against an untied copy whose memories hold equal values: same output, and the tied
    parameter's gradient is the sum of the untied copies' gradients."""
    tied = make(share_decay=True, share_kv_conv=True)
    free = make(seed=1)
    free.load_state_dict(tied.state_dict())  # every memory's copy of a shared tensor gets the same values
    x = torch.randn(2, 11, D, dtype=F64)
    y_t, _ = tied(x)
    y_f, _ = free(x)
    torch.testing.assert_close(y_t, y_f, atol=1e-12, rtol=1e-10)
    dy = torch.randn_like(y_t)
    y_t.backward(dy)
    y_f.backward(dy)
    mems_t, mems_f = tied.all_memories, free.all_memories
    assert all(m.gates.decay.A_log is mems_t[0].gates.decay.A_log for m in mems_t)
    assert all(m.k_conv is mems_t[0].k_conv for m in mems_t)
    for get in (lambda m: m.gates.decay.A_log, lambda m: m.gates.decay.dt_bias, lambda m: m.k_conv.weight,
                lambda m: m.v_conv.weight):
        torch.testing.assert_close(get(mems_t[0]).grad, sum(get(m).grad for m in mems_f), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("rule", ["gated_deltanet", "mamba2", "deltanet"])
def test_step_by_step_decoding_equals_forward_with_the_official_options(rule):
    opts = {k: v for k, v in OFFICIAL.items() if not (rule != "gated_deltanet" and k in ("share_decay", "beta_bias"))}
    if rule == "mamba2":
        opts["share_decay"] = True
    if rule == "deltanet":
        opts["beta_bias"] = False
    layer = make(rule=rule, **opts).eval()
    T, P = 12, 5
    x = torch.randn(2, T, D, dtype=F64)
    y_full, _ = layer(x)
    _, aux = layer(x[:, :P], use_cache=True)
    cache, ys = aux.cache, []
    for t in range(P, T):
        y_t, cache = layer.step(x[:, t], cache)
        ys.append(y_t)
    torch.testing.assert_close(torch.stack(ys, 1), y_full[:, P:], atol=1e-11, rtol=1e-9)


def test_fla_init():
    from momkit.layers.official import fla_init
    from momkit.rules.gates import DecayGate

    torch.manual_seed(0)
    gate = DecayGate(8, 4096)
    fla_init(gate)
    A = gate.A_log.detach().exp()
    assert bool((A > 0).all() and (A < 16).all())
    assert 0.04 < (A < 1).float().mean() < 0.09 and abs(A.mean() - 8) < 0.3  # U(0, 16), not momkit's U(1, 16)
    layer = make(init="fla")
    assert all(m.gates.decay.A_log.exp().max() < 16 for m in layer.all_memories)
    for name, sub in layer.named_modules():
        if isinstance(sub, torch.nn.Linear):
            fan_out, fan_in = sub.weight.shape
            bound = 2 ** -2.5 * (6 / (fan_in + fan_out)) ** 0.5
            assert sub.weight.abs().max() <= bound, name
            assert sub.bias is None or bool((sub.bias == 0).all()), name


def test_single_memory_layer_takes_beta_bias_and_init():
    cfg = MoMConfig(hidden_size=D, num_heads=H, head_dim=K, num_memories=1, topk=1, shared_memory=False,
                    beta_bias=False, init="fla")
    layer = SingleMemoryLayer(cfg)
    assert layer.memory.gates.beta.proj.bias is None
    y, _ = layer(torch.randn(1, 5, D))
    assert y.shape == (1, 5, D)


def test_deepcopy_keeps_the_sharing():
    layer = make(**OFFICIAL)
    twin = copy.deepcopy(layer)
    assert count(twin) == count(layer)
    assert twin.shared is twin.memories[0]


@pytest.mark.parametrize(("kw", "message"), [
    (dict(rule="gla", share_decay=True), "share_decay=True is invalid: rule 'gla' has no data-dependent decay"),
    (dict(rule="gla", beta_bias=False), "beta_bias=False is invalid: rule 'gla' has no beta gate"),
    (dict(short_conv=False, share_kv_conv=True), "share_kv_conv=True is invalid: needs short_conv=true"),
    (dict(shared_uses_routed_proj=True), "shared_uses_routed_proj=True is invalid: needs single_kv_proj=true"),
    (dict(init="xavier"), "init='xavier' is invalid: one of momkit, fla"),
    (dict(share_decay="yes"), "share_decay='yes' is invalid: must be true or false"),
])
def test_bad_official_options_name_the_key(kw, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        make(**kw)


def test_the_official_preset_builds_the_official_model():
    """``mom_official`` (a packaged config) at a small size: every MoM layer shares its decay and its k, v
    convolutions between memories, beta has no bias, and a training step runs."""
    from momkit import MoMLM
    from momkit.config import load_config

    cfg = load_config("mom_official", ["model.num_layers=2", "model.hidden_size=32", "model.mom.head_dim=8",
                                       "model.vocab_size=50"], validate_task=False)
    mom = cfg.model.resolved_mom()
    assert (mom.share_decay, mom.share_kv_conv, mom.beta_bias, mom.init) == (True, True, False, "fla")
    model = MoMLM(cfg.model)
    for block in model.blocks:
        mems = block.mixer.all_memories
        assert all(m.gates.decay.A_log is mems[0].gates.decay.A_log and m.v_conv is mems[0].v_conv for m in mems)
        assert all(m.gates.beta.proj.bias is None for m in mems)
        q = block.mixer.q_proj.weight  # fla's layer init survives the model's normal(0.02) init
        assert q.abs().max() <= 2 ** -2.5 * (6 / sum(q.shape)) ** 0.5
    ids = torch.randint(0, 50, (2, 12))
    out = model(ids, labels=ids)
    (out.loss + out.aux_loss).backward()


@pytest.mark.parametrize("kw", [{}, {"share_decay": True}, {"beta_bias": False}], ids=["default", "share_decay",
                                                                                          "no_beta_bias"])
def test_validating_a_config_leaves_the_random_generator_alone(kw):
    """The same seed builds the same model however often its config was validated: the official options'
    checks build gate modules to inspect, outside the global generator."""
    cfg = MoMConfig(hidden_size=16, num_heads=2, head_dim=8, rule="gated_deltanet", num_memories=2, **kw)
    state = torch.get_rng_state()
    cfg.validate()
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(0)
    a = MoMLayer(cfg).state_dict()
    torch.manual_seed(0)
    cfg.validate()
    b = MoMLayer(cfg).state_dict()
    assert all(torch.equal(a[n], b[n]) for n in a)
