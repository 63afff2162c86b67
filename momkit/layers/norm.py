"""RMSNorm and the per-head gated RMSNorm of the mixer output."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from momkit.rules.base import upcast

Tensor = torch.Tensor


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor, fused: bool = False) -> Tensor:
        """``fused``: one Triton kernel forward and one backward (``momkit.kernels.norms``), for rows of at most
        ``MAX_DIM`` values (longer rows run as torch ops)."""
        if fused:
            from momkit.kernels.norms import MAX_DIM, rms_norm

            if x.shape[-1] <= MAX_DIM:
                return rms_norm(x, self.weight, self.eps)
        xf = upcast(x)
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class GatedRMSNorm(RMSNorm):
    """``RMSNorm(o) * silu(gate)`` over the last axis (one head's value channels)."""

    def forward(self, x: Tensor, gate: Tensor, fused: bool = False) -> Tensor:  # type: ignore[override]
        """``fused``: one Triton kernel forward and one backward (``momkit.kernels.norms``)."""
        if fused:
            from momkit.kernels.norms import gated_rms_norm

            return gated_rms_norm(x, gate, self.weight, self.eps)
        return super().forward(x) * F.silu(gate)
