"""Short causal depthwise convolution (width W, SiLU), segment-aware.

``forward_packed`` runs on packed rows ``[N, C]`` where ``position[i]`` is row i's index within its
segment: tap ``s`` (the row ``s`` steps back) is used only if ``s <= position[i]``, so the convolution
never mixes rows of different segments (memories, sequences) and never sees padding. Both forms are
W shifted multiply-adds (torch's depthwise conv1d backward is pathologically slow on CPU).
``forward_dense`` runs on ``[B, T, C]`` with zero history; ``step`` advances one token from a tail
of the last ``W - 1`` inputs. With ``fused=True`` both run as one Triton kernel (``momkit.kernels.short_conv``:
one launch forward, two backward, instead of about 4 W elementwise passes), the layers' GPU path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor


class ShortConv(nn.Module):
    def __init__(self, channels: int, width: int = 4):
        super().__init__()
        self.channels, self.width = channels, width
        # weight[c, j] multiplies x[t - (W - 1) + j] (the layout of torch's causal conv1d)
        self.weight = nn.Parameter(torch.empty(channels, width))
        bound = 1 / math.sqrt(width)
        nn.init.uniform_(self.weight, -bound, bound)

    def forward_packed(self, x: Tensor, position: Tensor, fused: bool = False) -> Tensor:
        """x [N, C], position [N] -> [N, C]. Tap s (s rows back) is used only where ``position >= s``."""
        if fused:
            from momkit.kernels.short_conv import short_conv

            return short_conv(x, self.weight, position)
        W = self.width
        y = x * self.weight[:, W - 1]
        for s in range(1, W):
            shifted = F.pad(x[:-s], (0, 0, s, 0)) if s < x.shape[0] else torch.zeros_like(x)
            y = y + shifted * (position >= s).to(x.dtype)[:, None] * self.weight[:, W - 1 - s]
        return F.silu(y)

    def forward_dense(self, x: Tensor, fused: bool = False) -> Tensor:
        """x [B, T, C] (zero history) -> [B, T, C]."""
        if fused:
            B, T, C = x.shape
            position = torch.arange(T, device=x.device).repeat(B)
            return self.forward_packed(x.reshape(B * T, C), position, fused=True).view(B, T, C)
        # W shifted multiply-adds: torch's depthwise conv1d backward on CPU takes seconds on long inputs
        W, T = self.width, x.shape[1]
        xp = F.pad(x, (0, 0, W - 1, 0))
        y = xp[:, :T] * self.weight[:, 0]
        for j in range(1, W):
            y = y + xp[:, j : j + T] * self.weight[:, j]
        return F.silu(y)

    def step(self, x: Tensor, tail: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, C], tail [B, W - 1, C] (the last inputs, oldest first) -> (y [B, C], new tail)."""
        window = torch.cat([tail, x[:, None]], 1)  # [B, W, C]
        y = F.silu((window * self.weight.T[None]).sum(1))
        return y, window[:, 1:]
