"""The two behaviours of fla 0.6.0's MomAttention (the official MoM code) that momkit does not copy, shown on
CPU (docs/mom.md, "Differences from the official code"). Each test passes while the bug is there; the
converted momkit layer, with the same weights, does not have it."""

from __future__ import annotations

import torch


def _pair(MomAttention, training: bool):
    from momkit.interop import from_fla

    torch.manual_seed(0)
    ref = MomAttention(hidden_size=32, head_dim=8, num_heads=2, expand_v=1.0, num_memories=2, topk=2,
                       shared_mem=False, norm_eps=1e-6).train(training)
    return ref, from_fla(ref).train(training)


def test_unstable_sort_makes_fla_non_causal(fla_cpu_as_is):
    """``transform`` sorts the routed tokens with ``argsort()`` (not stable): on CPU, with 64 or more
    slots, tokens of one memory come out of time order, so changing the last token changes earlier outputs."""
    ref, ours = _pair(fla_cpu_as_is, training=False)
    x = torch.randn(1, 48, 32)
    later = x.clone()
    later[:, -1] += 1.0
    with torch.no_grad():
        changed_fla = (ref(later)[0] - ref(x)[0])[:, :-1].abs().max().item()
        changed_ours = (ours(later)[0] - ours(x)[0])[:, :-1].abs().max().item()
    assert changed_fla > 1e-3, "fla's earlier outputs depend on the last token"
    assert changed_ours == 0.0


def test_train_mode_convolutions_cross_sequences_in_fla(fla_cpu):
    """In ``train()`` mode fla sets ``conv_cu_seqlens = None``: the short convolutions run across the packed
    rows of different memories and sequences, so one sequence's output depends on another's tokens."""
    ref, ours = _pair(fla_cpu, training=True)
    x = torch.randn(2, 10, 32)
    other = x.clone()
    other[1] += 1.0  # change only the second sequence
    with torch.no_grad():
        changed_fla = (ref(other)[0] - ref(x)[0])[0].abs().max().item()
        changed_ours = (ours(other)[0] - ours(x)[0])[0].abs().max().item()
    assert changed_fla > 1e-3, "fla's first sequence depends on the second"
    assert changed_ours == 0.0
