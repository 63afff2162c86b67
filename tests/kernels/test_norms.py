"""The fused row normalisations (``momkit.kernels.norms``) against float64 torch: output and gradients."""

from __future__ import annotations

import pytest
import torch

from momkit.layers.norm import GatedRMSNorm, RMSNorm
from momkit.rules.base import l2_normalize

F64 = torch.float64
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("D", [20, 256])
def test_l2_norm_matches_float64(device, dtype, D):
    from momkit.kernels.norms import l2_norm

    gen = torch.Generator().manual_seed(D)
    x = torch.randn(3, 37, 2, D, generator=gen)
    x[0, 0, 0] = 0.0  # a zero row: eps keeps it finite
    dy = torch.randn(x.shape, generator=gen)
    x64 = x.to(F64).requires_grad_(True)
    y64 = l2_normalize(x64)
    y64.backward(dy.to(F64))
    xd = x.to(device=device, dtype=dtype).requires_grad_(True)
    y = l2_norm(xd)
    y.backward(dy.to(device=device, dtype=dtype))
    assert y.dtype == dtype and y.shape == x.shape
    assert _rel(y.cpu(), y64) < TOL[dtype], "output"
    assert _rel(xd.grad.cpu(), x64.grad) < TOL[dtype], "input gradient"


def _norm_and_float64_copy(cls, D: int, seed: int):
    """A norm of ``cls`` with random weights, its float64 copy, and the generator for the inputs."""
    gen = torch.Generator().manual_seed(seed)
    norm = cls(D, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(D, generator=gen))
    ref = cls(D, eps=1e-6).to(F64)
    ref.load_state_dict(norm.state_dict())
    return gen, norm, ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("D", [24, 256])
def test_gated_rms_norm_matches_float64(device, dtype, D):
    gen, norm, ref = _norm_and_float64_copy(GatedRMSNorm, D, seed=D + 1)
    x = torch.randn(2, 41, 3, D, generator=gen)
    gate = torch.randn(x.shape, generator=gen)
    dy = torch.randn(x.shape, generator=gen)
    x64, g64 = x.to(F64).requires_grad_(True), gate.to(F64).requires_grad_(True)
    ref(x64, g64).backward(dy.to(F64))
    fused = GatedRMSNorm(D, eps=1e-6).to(device=device, dtype=dtype)
    fused.load_state_dict(norm.state_dict())
    xd = x.to(device=device, dtype=dtype).requires_grad_(True)
    gd = gate.to(device=device, dtype=dtype).requires_grad_(True)
    y = fused(xd, gd, fused=True)
    y.backward(dy.to(device=device, dtype=dtype))
    tol = TOL[dtype]
    assert y.dtype == dtype
    assert _rel(y.cpu(), ref(x.to(F64), gate.to(F64))) < tol, "output"
    assert _rel(xd.grad.cpu(), x64.grad) < tol, "input gradient"
    assert _rel(gd.grad.cpu(), g64.grad) < tol, "gate gradient"
    assert _rel(fused.weight.grad.cpu(), ref.weight.grad) < tol, "weight gradient"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("D", [24, 1024])
def test_rms_norm_matches_float64(device, dtype, D):
    """The blocks' pre-norm (no gate) fused, against the module's torch ops in float64."""
    gen, norm, ref = _norm_and_float64_copy(RMSNorm, D, seed=D + 2)
    x = torch.randn(3, 29, D, generator=gen)
    dy = torch.randn(x.shape, generator=gen)
    x64 = x.to(F64).requires_grad_(True)
    ref(x64).backward(dy.to(F64))
    fused = RMSNorm(D, eps=1e-6).to(device=device, dtype=dtype)
    fused.load_state_dict(norm.state_dict())
    xd = x.to(device=device, dtype=dtype).requires_grad_(True)
    y = fused(xd, fused=True)
    y.backward(dy.to(device=device, dtype=dtype))
    tol = TOL[dtype]
    assert y.dtype == dtype
    assert _rel(y.cpu(), ref(x.to(F64))) < tol, "output"
    assert _rel(xd.grad.cpu(), x64.grad) < tol, "input gradient"
    assert _rel(fused.weight.grad.cpu(), ref.weight.grad) < tol, "weight gradient"


def test_rms_norm_of_rows_longer_than_a_block_runs_as_torch_ops():
    """Rows over ``MAX_DIM`` values: the module falls back to its torch ops (the kernel refuses them)."""
    from momkit.kernels.norms import MAX_DIM, rms_norm

    norm = RMSNorm(MAX_DIM + 8)
    x = torch.randn(2, MAX_DIM + 8)
    assert torch.equal(norm(x, fused=True), norm(x))
    with pytest.raises(ValueError, match=f"rows of at most {MAX_DIM} values"):
        rms_norm(x, norm.weight, 1e-6)
