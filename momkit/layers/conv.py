"""Short causal depthwise convolution (width W, SiLU), segment-aware.

``forward_packed`` runs on packed rows ``[N, C]`` where ``position[i]`` is row i's index within its
segment: tap ``s`` (the row ``s`` steps back) is used only if ``s <= position[i]``, so the convolution
never mixes rows of different segments (memories, sequences) and never sees padding.
``forward_dense`` runs on ``[B, T, C]`` with zero history; ``step`` advances one token from a tail
of the last ``W - 1`` inputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from momkit.rules._chunking import gather_rows, scatter_rows

Tensor = torch.Tensor


class ShortConv(nn.Module):
    def __init__(self, channels: int, width: int = 4):
        super().__init__()
        self.channels, self.width = channels, width
        # weight[c, j] multiplies x[t - (W - 1) + j] (the layout of torch's causal conv1d)
        self.weight = nn.Parameter(torch.empty(channels, width))
        bound = 1 / math.sqrt(width)
        nn.init.uniform_(self.weight, -bound, bound)

    def forward_packed(self, x: Tensor, position: Tensor) -> Tensor:
        """x [N, C], position [N] -> [N, C]. Every segment gets W - 1 zero rows in front, so one
        dense convolution over the gapped sequence sees no other segment."""
        if x.shape[0] == 0:
            return x
        segments_so_far = (position == 0).long().cumsum(0)
        gapped = torch.arange(x.shape[0], device=x.device) + (self.width - 1) * segments_so_far
        length = x.shape[0] + (self.width - 1) * int(segments_so_far[-1])
        y = self.forward_dense(scatter_rows(x, gapped, length)[None])[0]
        return gather_rows(y, gapped)

    def forward_dense(self, x: Tensor) -> Tensor:
        """x [B, T, C] (zero history) -> [B, T, C]."""
        y = F.conv1d(F.pad(x.transpose(1, 2), (self.width - 1, 0)), self.weight[:, None, :], groups=self.channels)
        return F.silu(y.transpose(1, 2))

    def step(self, x: Tensor, tail: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, C], tail [B, W - 1, C] (the last inputs, oldest first) -> (y [B, C], new tail)."""
        window = torch.cat([tail, x[:, None]], 1)  # [B, W, C]
        y = F.silu((window * self.weight.T[None]).sum(1))
        return y, window[:, 1:]
