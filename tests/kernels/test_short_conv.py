"""The fused short convolution (``momkit.kernels.short_conv``) against float64 torch: output, and the
gradients of the input and of the weight, on packed rows whose segments must not mix."""

from __future__ import annotations

import itertools

import pytest
import torch

from momkit.config import ConfigError
from momkit.layers.conv import ShortConv
from momkit.layers.norm import GatedRMSNorm

F64 = torch.float64
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("lengths", [[5, 0, 1, 70, 3], [130]], ids=["segments", "one"])
@pytest.mark.parametrize("shift", [{"SHIFT": 1, "BC": 64}, {"SHIFT": 1, "BC": 128}, {"SHIFT": 2}, {"SHIFT": 3},
                                   {"SHIFT": 4, "BN": 16, "BC": 64}],
                         ids=["gathered-shifts", "gathered-shifts-bc128", "recomputed-shifts", "dz-in-memory",
                              "rows-in-sequence"])
def test_fused_conv_matches_float64(device, dtype, lengths, shift, monkeypatch):
    from momkit.kernels import _common

    monkeypatch.setitem(_common.LAUNCH, "conv.bwd", shift)
    gen = torch.Generator().manual_seed(len(lengths) * 7 + int(dtype == torch.bfloat16))
    C, W = 72, 4  # C past one 128-wide channel block is covered by the GPU run; here a partial block
    conv = ShortConv(C, W)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(C, W, generator=gen))
    N = sum(lengths)
    position = torch.cat([torch.arange(n) for n in lengths])
    x = torch.randn(N, C, generator=gen)
    dy = torch.randn(N, C, generator=gen)

    ref = ShortConv(C, W).to(F64)
    with torch.no_grad():
        ref.weight.copy_(conv.weight.to(F64))
    x64 = x.to(F64).requires_grad_(True)
    y64 = ref.forward_packed(x64, position)
    y64.backward(dy.to(F64))

    fused = ShortConv(C, W).to(device=device, dtype=dtype)
    with torch.no_grad():
        fused.weight.copy_(conv.weight)
    xd = x.to(device=device, dtype=dtype).requires_grad_(True)
    y = fused.forward_packed(xd, position.to(device), fused=True)
    y.backward(dy.to(device=device, dtype=dtype))
    tol = TOL[dtype]
    assert y.dtype == dtype and xd.grad.dtype == dtype
    assert _rel(y.cpu(), y64) < tol, "output"
    assert _rel(xd.grad.cpu(), x64.grad) < tol, "input gradient"
    assert _rel(fused.weight.grad.cpu(), ref.weight.grad) < tol, "weight gradient"


@pytest.mark.parametrize("shift", [{"SHIFT": 1}, {"SHIFT": 2}, {"SHIFT": 3}, {"SHIFT": 4, "BN": 16}],
                         ids=["gathered-shifts", "recomputed-shifts", "dz-in-memory", "rows-in-sequence"])
@pytest.mark.parametrize(("C", "split", "BC", "grouped"), [(72, (24, 50), 32, False), (192, (32, 96), 32, False),
                                                           (192, (32, 96), 32, True), (96, 32, 32, True)],
                         ids=["inside-blocks", "on-block-edges", "on-block-edges-groups", "two-parts-groups"])
def test_split_parts_match_float64(device, shift, C, split, BC, grouped, monkeypatch):
    """The output as contiguous column parts (the single layer's q | k | v, a memory's k | v) from separate
    upstream gradients, against float64 torch: with part boundaries inside channel blocks (each block reads
    and writes every part it touches) and on block edges (each block's one part); with one weight and with a
    weight per row range (parts of unequal widths, so that a part read with another's row stride shows). An
    unused part (its gradient zeros) leaves the others' exact."""
    from momkit.kernels import _common
    from momkit.kernels.short_conv import short_conv

    monkeypatch.setitem(_common.LAUNCH, "conv.fwd", {"BC": BC})
    monkeypatch.setitem(_common.LAUNCH, "conv.bwd", {**shift, "BC": BC})
    gen = torch.Generator().manual_seed(17 + C)
    W, lengths = 4, [40, 1, 90]
    bounds = (0, *((split,) if isinstance(split, int) else split), C)
    position = torch.cat([torch.arange(n) for n in lengths])
    groups = [(0, 41), (41, 131)] if grouped else None
    x = torch.randn(len(position), C, generator=gen)
    w = torch.randn(*([2] if grouped else []), C, W, generator=gen)
    dys = [torch.randn(len(position), b - a, generator=gen) for a, b in itertools.pairwise(bounds)]
    dys[1].zero_()  # as autograd passes for a part nothing downstream reads

    x64, w64 = x.to(F64).requires_grad_(True), w.to(F64).requires_grad_(True)
    ranges = groups or [(0, len(position))]
    ref = torch.cat([ShortConv.forward_packed(_weighted(w64[i] if grouped else w64, W), x64[a:b], position[a:b])
                     for i, (a, b) in enumerate(ranges)])
    ref.backward(torch.cat(dys, 1).to(F64))

    xd, wd = x.to(device).requires_grad_(True), w.to(device).requires_grad_(True)
    parts = short_conv(xd, wd, position.to(device), groups=groups, split=split)
    assert [t.shape[1] for t in parts] == [b - a for a, b in itertools.pairwise(bounds)]
    assert all(t.is_contiguous() for t in parts)
    used = [i for i in range(len(parts)) if i != 1]
    torch.autograd.backward([parts[i] for i in used], [dys[i].to(device) for i in used])
    assert _rel(torch.cat(parts, 1).detach().cpu(), ref.detach()) < 1e-5, "output"
    assert _rel(xd.grad.cpu(), x64.grad) < 1e-5, "input gradient"
    assert _rel(wd.grad.cpu(), w64.grad) < 1e-5, "weight gradient"


@pytest.mark.parametrize("W", [1, 2, 3, 5])
def test_rows_in_sequence_at_every_width(device, W, monkeypatch):
    """The sequential backward (SHIFT 4) keeps W - 1 rows of history for widths up to 4 (wider ones take SHIFT
    1): the gradients against float64 torch at widths 1, 2, 3 and 5, on segments shorter and longer than W,
    in blocks that end inside segments."""
    from momkit.kernels import _common

    monkeypatch.setitem(_common.LAUNCH, "conv.bwd", {"SHIFT": 4, "BN": 8, "BC": 32})
    gen = torch.Generator().manual_seed(30 + W)
    C, lengths = 24, [2, 1, 19, 3, 30]
    position = torch.cat([torch.arange(n) for n in lengths])
    x = torch.randn(len(position), C, generator=gen)
    dy = torch.randn(len(position), C, generator=gen)
    ref = ShortConv(C, W).to(F64)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(C, W, generator=gen))
    x64 = x.to(F64).requires_grad_(True)
    ref.forward_packed(x64, position).backward(dy.to(F64))

    conv = ShortConv(C, W).to(device)
    with torch.no_grad():
        conv.weight.copy_(ref.weight.float())
    xd = x.to(device).requires_grad_(True)
    conv.forward_packed(xd, position.to(device), fused=True).backward(dy.to(device))
    assert _rel(xd.grad.cpu(), x64.grad) < 1e-5, "input gradient"
    assert _rel(conv.weight.grad.cpu(), ref.weight.grad) < 1e-5, "weight gradient"


def test_fused_dense_matches_unfused(device):
    """``forward_dense`` (zero history per sequence): the fused kernel on rows against the torch form."""
    gen = torch.Generator().manual_seed(3)
    conv = ShortConv(20, 3)
    x = torch.randn(2, 9, 20, generator=gen)
    y_ref = conv.to(F64).forward_dense(x.to(F64))
    y = conv.to(device=device, dtype=torch.float32).forward_dense(x.to(device), fused=True)
    assert _rel(y.cpu(), y_ref) < 1e-5


def test_float32_weight_with_bfloat16_input_keeps_its_precision(device):
    """Under autocast the parameters stay float32: the kernels read them as they are, and their gradient
    is float32-accurate (not rounded through bfloat16, which would be ~1e-3 off)."""
    from momkit.kernels.norms import gated_rms_norm
    from momkit.kernels.short_conv import short_conv

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(40, 20, generator=gen).to(torch.bfloat16)
    w = torch.randn(20, 4, generator=gen)
    gate = torch.randn(40, 20, generator=gen)
    wn = torch.randn(20, generator=gen)

    ref = ShortConv(20, 4).to(F64)
    with torch.no_grad():
        ref.weight.copy_(w.to(F64))
    ref.forward_packed(x.to(F64), torch.arange(40)).sum().backward()
    wd = w.to(device).requires_grad_(True)
    y = short_conv(x.to(device), wd, torch.arange(40, device=device))
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and wd.grad.dtype == torch.float32
    assert _rel(wd.grad.cpu(), ref.weight.grad) < 1e-5, "conv weight gradient"

    norm = GatedRMSNorm(20, eps=1e-6).to(F64)
    with torch.no_grad():
        norm.weight.copy_(wn.to(F64))
    norm(x.to(F64), gate.to(F64)).sum().backward()
    wnd = wn.to(device).requires_grad_(True)
    z = gated_rms_norm(x.to(device), gate.to(device), wnd, 1e-6)
    z.float().sum().backward()
    assert z.dtype == torch.bfloat16 and wnd.grad.dtype == torch.float32
    assert _rel(wnd.grad.cpu(), norm.weight.grad) < 1e-5, "norm weight gradient"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("split", [None, 24, (24, 50)], ids=["whole", "split", "split3"])
@pytest.mark.parametrize("blocks", [{}, {"conv.fwd": {"BN": 16}, "conv.bwd": {"BN": 32, "BC": 32}},
                                    {"conv.bwd": {"SHIFT": 2}}, {"conv.bwd": {"SHIFT": 3, "BN": 32}},
                                    {"conv.bwd": {"SHIFT": 4, "BN": 32}}],
                         ids=["default-blocks", "small-blocks", "recomputed-shifts", "dz-in-memory",
                              "rows-in-sequence"])
def test_groups_with_their_own_weights_match_float64(device, dtype, split, blocks, monkeypatch):
    """Row ranges each convolved with their own weight in one launch (a mixture's memories), with the output
    in two column parts: against a float64 convolution per range. Ranges are not multiples of the row block
    (one is empty, one spans several blocks) and hold several segments each; the forward and backward row
    blocks may differ (launch options), and the backward may recompute dz at each shift (SHIFT 2) or write it to
    memory for a second pass (SHIFT 3)."""
    from momkit.kernels import _common
    from momkit.kernels.short_conv import short_conv

    for key, opts in blocks.items():
        monkeypatch.setitem(_common.LAUNCH, key, opts)

    seed = 11 + int(dtype == torch.bfloat16) + (sum(split) if isinstance(split, tuple) else split or 0)
    gen = torch.Generator().manual_seed(seed)
    C, W = 72, 4
    segments = [[5, 3], [], [70, 1, 66], [9]]  # segment lengths per group
    groups, start = [], 0
    for seg in segments:
        groups.append((start, start + sum(seg)))
        start += sum(seg)
    N = start
    position = torch.cat([torch.arange(n) for seg in segments for n in seg])
    x = torch.randn(N, C, generator=gen)
    weight = torch.randn(len(segments), C, W, generator=gen)
    dy = torch.randn(N, C, generator=gen)

    x64, w64 = x.to(F64).requires_grad_(True), weight.to(F64).requires_grad_(True)
    ref = torch.cat([ShortConv.forward_packed(_weighted(w64[g], W), x64[a:b], position[a:b])
                     for g, (a, b) in enumerate(groups)])
    ref.backward(dy.to(F64))

    xd = x.to(device=device, dtype=dtype).requires_grad_(True)
    wd = weight.to(device).requires_grad_(True)
    out = short_conv(xd, wd, position.to(device), groups=groups, split=split)
    parts = (out,) if split is None else out
    assert all(p.is_contiguous() and p.dtype == dtype for p in parts)
    bounds = [0, *([] if split is None else [split] if isinstance(split, int) else split), C]
    assert [p.shape[1] for p in parts] == [b - a for a, b in itertools.pairwise(bounds)]
    y = torch.cat(parts, 1)
    y.backward(dy.to(device=device, dtype=dtype))
    tol = TOL[dtype]
    assert _rel(y.cpu(), ref) < tol, "output"
    assert _rel(xd.grad.cpu(), x64.grad) < tol, "input gradient"
    assert wd.grad.dtype == torch.float32
    for g, (a, b) in enumerate(groups):
        if a < b:
            assert _rel(wd.grad[g].cpu(), w64.grad[g]) < tol, f"weight gradient of group {g}"
        else:
            assert wd.grad[g].abs().max() == 0, "an empty group's weight gets no gradient"


def _weighted(weight: torch.Tensor, W: int):
    """A stand-in ``self`` for ``ShortConv.forward_packed`` with ``weight`` (a slice of a stacked tensor)."""
    class Holder:
        pass

    h = Holder()
    h.weight, h.width = weight, W
    return h


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(groups=[(0, 10), (10, 19)]), r"groups=\[\(0, 10\), \(10, 19\)\] are invalid"),
    (dict(groups=[(0, 20)]), r"2 consecutive row ranges"),
    (dict(groups=[(0, 12), (10, 20)]), r"are invalid"),
    (dict(split=72), r"split=72 is invalid: one or two ascending column boundaries s with 0 < s < C=72"),
    (dict(split=(30, 20)), r"split=\(30, 20\) is invalid: one or two ascending"),
    (dict(split=(10, 20, 30)), r"split=\(10, 20, 30\) is invalid"),
    (dict(split=(0, 20)), r"split=\(0, 20\) is invalid"),
])
def test_bad_groups_or_split_are_refused_with_the_reason(kwargs, message):
    from momkit.kernels.short_conv import short_conv

    weight = torch.randn(2, 72, 4) if "groups" in kwargs else torch.randn(72, 4)
    with pytest.raises(ValueError, match=message):
        short_conv(torch.randn(20, 72), weight, torch.arange(20), **kwargs)


@pytest.mark.parametrize("W, grouped, given, shift", [(4, False, {}, 4), (2, True, {}, 4), (5, False, {}, 1),
                                                      (5, True, {}, 3), (4, False, {"SHIFT": 1}, 1),
                                                      (4, True, {"SHIFT": 3}, 3), (5, False, {"SHIFT": 4}, 1)])
def test_backward_form_by_width_and_launch_options(W, grouped, given, shift, monkeypatch):
    """Up to width 4 the backward is the sequential form unless the launch options pick another; a form picked
    that way, or taken by a wider convolution, starts from its own defaults (not the sequential form's warps)."""
    from momkit.kernels import _common
    from momkit.kernels import short_conv as sc

    monkeypatch.setitem(_common.LAUNCH, "conv.bwd", given)
    opts = sc._bwd_options(W, grouped, torch.device("cpu"))
    assert opts["SHIFT"] == shift
    assert ("num_warps" in opts) == (shift == 4)
    if not given:
        own = sc.BWD_SEQ if W <= 4 else sc.BWD_GROUPED if grouped else sc.BWD_PLAIN
        assert opts == own


@pytest.mark.parametrize("W, given", [(4, {"SHIFT": 1, "BC": 16}), (5, {"BC": 16})])
def test_gathered_shifts_in_narrow_blocks_are_refused_on_hopper(W, given, monkeypatch):
    """SHIFT 1 in channel blocks narrower than 32 does not compile on Hopper under Triton 3.6: asked for (or
    taken by a width over 4), it fails the forward with one error naming the option; elsewhere it runs."""
    from momkit.kernels import _common
    from momkit.kernels import short_conv as sc

    monkeypatch.setitem(_common.LAUNCH, "conv.bwd", given)
    assert sc._bwd_options(W, False, torch.device("cpu"))["BC"] == 16
    monkeypatch.setattr(sc, "_is_hopper", lambda device: True)
    x = torch.randn(10, 8, requires_grad=True)
    with pytest.raises(ConfigError, match=r"^launch option conv.bwd:BC=16 is invalid with SHIFT 1.* use BC >= 32$"):
        sc.short_conv(x, torch.randn(8, W), torch.arange(10))
