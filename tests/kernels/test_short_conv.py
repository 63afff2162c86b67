"""The fused short convolution (``momkit.kernels.short_conv``) against float64 torch: output, and the
gradients of the input and of the weight, on packed rows whose segments must not mix."""

from __future__ import annotations

import pytest
import torch

from momkit.layers.conv import ShortConv
from momkit.layers.norm import GatedRMSNorm

F64 = torch.float64
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("lengths", [[5, 0, 1, 70, 3], [130]], ids=["segments", "one"])
def test_fused_conv_matches_float64(device, dtype, lengths):
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
