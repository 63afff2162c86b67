"""Causal softmax attention with rotary positions (torch SDPA): the Transformer baseline mixer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from momkit.rules.base import upcast

Tensor = torch.Tensor


def rotary(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """Rotate x [B, T, H, d] by its positions [B, T] (GPT-NeoX half-split layout)."""
    d = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.promote_types(x.dtype, torch.float32)) / d)
    ang = positions.to(inv_freq.dtype)[..., None] * inv_freq  # [B, T, d/2]
    cos, sin = ang.cos()[:, :, None], ang.sin()[:, :, None]
    x1, x2 = upcast(x).chunk(2, -1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)


@dataclass
class AttentionCache:
    k: Tensor  # [B, H, T, d]
    v: Tensor
    key_mask: Tensor  # [B, T] real keys
    position: Tensor  # [B] real tokens so far


class CausalAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, rope_theta: float = 10000.0):
        super().__init__()
        self.num_heads, self.head_dim, self.theta = num_heads, hidden_size // num_heads, rope_theta
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def _qkv(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim).unbind(2)
        return rotary(q, positions, self.theta), rotary(k, positions, self.theta), v

    def forward(self, x: Tensor, attention_mask: Tensor | None = None, token_ids: Tensor | None = None,
                use_cache: bool = False) -> tuple[Tensor, AttentionCache | None]:
        B, T, D = x.shape
        mask = torch.ones(B, T, dtype=torch.bool, device=x.device) if attention_mask is None else attention_mask.bool()
        positions = (mask.long().cumsum(1) - 1).clamp_min(0)
        q, k, v = (t.transpose(1, 2) for t in self._qkv(x, positions))
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        allowed = causal & mask[:, None, :]  # [B, T, T]
        allowed = allowed | torch.eye(T, dtype=torch.bool, device=x.device)  # padded queries see themselves
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])
        y = self.o_proj(o.transpose(1, 2).reshape(B, T, D))
        cache = AttentionCache(k, v, mask, mask.sum(1)) if use_cache else None
        return y, cache

    def step(self, x: Tensor, cache: AttentionCache, token_ids: Tensor | None = None) -> tuple[Tensor, AttentionCache]:
        B, D = x.shape
        q, k, v = (t.transpose(1, 2) for t in self._qkv(x[:, None], cache.position[:, None]))
        K = torch.cat([cache.k, k], 2)
        Vv = torch.cat([cache.v, v], 2)
        key_mask = torch.cat([cache.key_mask, torch.ones(B, 1, dtype=torch.bool, device=x.device)], 1)
        o = F.scaled_dot_product_attention(q, K, Vv, attn_mask=key_mask[:, None, None, :])
        y = self.o_proj(o.transpose(1, 2).reshape(B, D))
        return y, AttentionCache(K, Vv, key_mask, cache.position + 1)

    def init_cache(self, batch_size: int, device=None, dtype=torch.float32) -> AttentionCache:
        z = torch.zeros(batch_size, self.num_heads, 0, self.head_dim, device=device, dtype=dtype)
        return AttentionCache(z, z.clone(), torch.zeros(batch_size, 0, dtype=torch.bool, device=device),
                              torch.zeros(batch_size, dtype=torch.long, device=device))
