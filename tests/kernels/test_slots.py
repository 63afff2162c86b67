"""The fused dispatch and combine (``momkit.kernels.slots``) against the float64 torch dispatch: outputs,
and the gradients of the per-token input, the rows and the routing weights."""

from __future__ import annotations

import pytest
import torch

from momkit.routing import Dispatch

F64 = torch.float64
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _dispatch(B: int, T: int, M: int, k: int, gen: torch.Generator, device) -> Dispatch:
    """Top-k routing over M memories plus a shared slot, with dropped slots and padding."""
    scores = torch.rand(B, T, M, generator=gen)
    idx = scores.topk(k, -1).indices
    kept = torch.rand(B, T, k, generator=gen) > 0.2  # capacity drops
    kept[0, :3] = False  # left padding: no slot at all
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, :3] = False
    idx = torch.cat([idx, torch.full_like(idx[..., :1], M)], -1)
    kept = torch.cat([kept, mask[..., None]], -1)
    w = torch.rand(B, T, k + 1, generator=gen)
    return Dispatch.build(idx.to(device), w.to(device), kept.to(device), M + 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("C", [40, 300])
def test_fused_gather_and_combine_match_float64(device, dtype, C):
    gen = torch.Generator().manual_seed(C + int(dtype == torch.bfloat16))
    B, T, M, k = 2, 37, 4, 2
    disp = _dispatch(B, T, M, k, gen, device)
    x = torch.randn(B, T, C, generator=gen)
    d_rows = torch.randn(disp.num_rows, C, generator=gen)
    rows = torch.randn(disp.num_rows, C, generator=gen)
    d_out = torch.randn(B, T, C, generator=gen)
    w0 = disp.weight.detach().cpu()

    ref = _dispatch(B, T, M, k, torch.Generator().manual_seed(C + int(dtype == torch.bfloat16)), "cpu")
    x64, rows64 = x.to(F64).requires_grad_(True), rows.to(F64).requires_grad_(True)
    ref.weight = w0.to(F64).requires_grad_(True)
    (ref.gather(x64) * d_rows.to(F64)).sum().backward()
    out64 = ref.combine(rows64)
    out64.backward(d_out.to(F64))

    xd = x.to(device=device, dtype=dtype).requires_grad_(True)
    rd = rows.to(device=device, dtype=dtype).requires_grad_(True)
    disp.weight = w0.to(device).requires_grad_(True)
    got = disp.gather(xd, fused=True)
    assert got.dtype == dtype and got.shape == (disp.num_rows, C)
    assert _rel(got.cpu(), ref.gather(x64).detach()) < TOL[dtype], "gathered rows"
    got.backward(d_rows.to(device=device, dtype=dtype))
    out = disp.combine(rd, fused=True)
    out.backward(d_out.to(device=device, dtype=dtype))
    tol = TOL[dtype]
    assert out.dtype == dtype and out.shape == (B, T, C)
    assert _rel(out.cpu(), out64) < tol, "combined output"
    assert out[0, :3].abs().max().item() == 0, "a token without rows reads 0"
    assert _rel(xd.grad.cpu(), x64.grad) < tol, "gradient of the per-token input"
    assert _rel(rd.grad.cpu(), rows64.grad) < tol, "gradient of the rows"
    assert _rel(disp.weight.grad.cpu(), ref.weight.grad) < tol, "gradient of the routing weights"


def test_fused_combine_without_weight_gradient(device):
    """Fixed weights (no gradient wanted): the backward gives the rows' gradient only."""
    gen = torch.Generator().manual_seed(5)
    disp = _dispatch(1, 20, 3, 1, gen, device)
    rows = torch.randn(disp.num_rows, 16, generator=gen, device="cpu").to(device).requires_grad_(True)
    out = disp.combine(rows, fused=True)
    out.sum().backward()
    expected = disp.weight.detach().to(torch.float32)[:, None].expand(-1, 16).cpu()
    assert _rel(rows.grad.cpu(), expected) < 1e-6
