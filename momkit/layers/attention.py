"""Causal softmax attention with rotary positions (torch SDPA): the Transformer baseline mixer.

x [B, T, D] -> q, k, v [B, H, T, d] (rotary on q, k) -> SDPA -> o_proj. Without padding SDPA runs with
``is_causal=True`` and no mask tensor (its flash / memory-efficient kernels on GPU). With left padding
(``attention_mask`` [B, T], 1 = real token) it gets a [B, 1, T, T] boolean mask: causal, real keys only,
each padded query sees itself (its output is never used); rotary positions count real tokens only.

Decoding keeps keys and values in preallocated buffers [B, H, capacity, d] written in place, one slot
per token; ``generate`` sizes them for the prompt plus the new tokens, and a step past the end doubles
the capacity (one copy). Padding sits on the left, so every sequence uses the same slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from momkit.rules.base import upcast

Tensor = torch.Tensor


def rotary(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """Rotate x [B, T, H, d] by its positions [B, T] or [1, T] (GPT-NeoX half-split layout)."""
    d = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.promote_types(x.dtype, torch.float32)) / d)
    ang = positions.to(inv_freq.dtype)[..., None] * inv_freq  # [B, T, d/2]
    cos, sin = ang.cos()[:, :, None], ang.sin()[:, :, None]
    x1, x2 = upcast(x).chunk(2, -1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)


@dataclass
class AttentionCache:
    """Keys and values so far, in preallocated buffers; ``CausalAttention.step`` advances it in place."""

    k: Tensor  # [B, H, capacity, d]; slots [0, length) are filled
    v: Tensor  # [B, H, capacity, d]
    key_mask: Tensor | None  # [B, capacity] real keys; None when no slot holds padding
    position: Tensor  # [B] real tokens so far (the rotary position of the next token)
    length: int  # filled slots, the same for every sequence

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def reserve(self, slots: int) -> None:
        """Room for at least ``slots`` slots: if there is less, the capacity becomes max(slots, 2 * capacity)."""
        if slots <= self.capacity:
            return
        cap = max(slots, 2 * self.capacity)
        L = self.length
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_empty(*old.shape[:2], cap, old.shape[3])
            new[:, :, :L] = old[:, :, :L]
            setattr(self, name, new)
        if self.key_mask is not None:
            mask = self.key_mask.new_ones(self.key_mask.shape[0], cap)
            mask[:, :L] = self.key_mask[:, :L]
            self.key_mask = mask


# The attention kernels a decoding step may use. cuDNN's is left out: it builds an execution plan for each new
# key length, and a decoding step's key length grows by one every token, so every step would pay for a new plan
# (H100, torch 2.11, the benchmark's 12-layer attention LM at 4K context, batch 1: 45.7 ms per token with cuDNN
# first, 9.6 without).
DECODE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _check_capacity(capacity: int | None) -> None:
    if capacity is not None and (not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 0):
        raise ValueError(f"cache_capacity must be None or an int >= 0, got {capacity!r}")


class CausalAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, rope_theta: float = 10000.0):
        super().__init__()
        self.num_heads, self.head_dim, self.theta = num_heads, hidden_size // num_heads, rope_theta
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def _qkv(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v [B, H, T, d], rotary applied to q and k."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim).unbind(2)
        return (rotary(q, positions, self.theta).transpose(1, 2), rotary(k, positions, self.theta).transpose(1, 2),
                v.transpose(1, 2))

    def forward(self, x: Tensor, attention_mask: Tensor | None = None, token_ids: Tensor | None = None,
                use_cache: bool = False, cache_capacity: int | None = None) -> tuple[Tensor, AttentionCache | None]:
        """x [B, T, D]; attention_mask [B, T] (1 = real token; left padding). With use_cache, also the
        cache, with room for ``cache_capacity`` slots (default T; at least T)."""
        B, T, D = x.shape
        _check_capacity(cache_capacity)
        mask = None
        if attention_mask is not None:
            if attention_mask.shape != x.shape[:2]:
                raise ValueError(f"attention_mask must have shape {list(x.shape[:2])}, got "
                                 f"{list(attention_mask.shape)}")
            if not bool(attention_mask.all()):
                mask = attention_mask.bool()
        if mask is None:
            q, k, v = self._qkv(x, torch.arange(T, device=x.device)[None])
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            q, k, v = self._qkv(x, (mask.long().cumsum(1) - 1).clamp_min(0))
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            allowed = (causal & mask[:, None, :]) | torch.eye(T, dtype=torch.bool, device=x.device)  # [B, T, T]
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])
        y = self.o_proj(o.transpose(1, 2).reshape(B, T, D))
        if not use_cache:
            return y, None
        cache = self.init_cache(B, device=x.device, dtype=k.dtype, capacity=max(T, cache_capacity or 0),
                                padded=mask is not None)
        cache.k[:, :, :T], cache.v[:, :, :T] = k, v
        if mask is not None:
            cache.key_mask[:, :T] = mask
        cache.length = T
        cache.position = torch.full((B,), T, device=x.device) if mask is None else mask.sum(1)
        return y, cache

    def step(self, x: Tensor, cache: AttentionCache, token_ids: Tensor | None = None) -> tuple[Tensor, AttentionCache]:
        """One decoding token: x [B, D] -> (y [B, D], cache), the cache advanced in place."""
        B, D = x.shape
        q, k, v = self._qkv(x[:, None], cache.position[:, None])  # [B, H, 1, d]
        t = cache.length
        cache.reserve(t + 1)
        cache.k[:, :, t], cache.v[:, :, t] = k[:, :, 0], v[:, :, 0]
        cache.length = L = t + 1
        cache.position += 1
        mask = None if cache.key_mask is None else cache.key_mask[:, None, None, :L]
        with sdpa_kernel(DECODE_BACKENDS):
            o = F.scaled_dot_product_attention(q, cache.k[:, :, :L], cache.v[:, :, :L], attn_mask=mask)
        return self.o_proj(o.reshape(B, D)), cache

    def init_cache(self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                   capacity: int = 0, padded: bool = False) -> AttentionCache:
        """An empty cache with room for ``capacity`` tokens (it grows when full); ``padded``: with a key mask."""
        _check_capacity(capacity)
        z = torch.empty(batch_size, self.num_heads, capacity, self.head_dim, device=device, dtype=dtype)
        mask = torch.ones(batch_size, capacity, dtype=torch.bool, device=device) if padded else None
        return AttentionCache(z, torch.empty_like(z), mask, torch.zeros(batch_size, dtype=torch.long, device=device), 0)
