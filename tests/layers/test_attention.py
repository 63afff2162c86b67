"""CausalAttention: the flash-eligible path without padding, the masked path with left padding, and decoding
with a preallocated KV cache against the full forward."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from momkit.layers import CausalAttention

F64 = torch.float64
D, H = 16, 2


def make(seed=0):
    torch.manual_seed(seed)
    return CausalAttention(D, H).double().eval()


def left_padding(lengths, T):
    mask = torch.zeros(len(lengths), T, dtype=torch.bool)
    for b, L in enumerate(lengths):
        mask[b, T - L:] = True
    return mask


def reference(layer, x, mask):
    """Softmax attention written out: causal, real keys only, rotary positions counting real tokens."""
    B, T, _ = x.shape
    pos = (mask.long().cumsum(1) - 1).clamp_min(0)
    q, k, v = layer._qkv(x, pos)
    scores = q @ k.mT / math.sqrt(layer.head_dim)
    allowed = torch.ones(T, T, dtype=torch.bool).tril() & mask[:, None, None, :]
    o = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
    return layer.o_proj(o.transpose(1, 2).reshape(B, T, D))


def test_unpadded_forward_passes_no_mask_tensor(monkeypatch):
    layer = make()
    seen = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda *a, **kw: seen.append((kw.get("attn_mask"), kw.get("is_causal"))) or sdpa(*a, **kw))
    x = torch.randn(2, 9, D, dtype=F64)
    for m in (None, torch.ones(2, 9, dtype=torch.bool)):
        layer(x, attention_mask=m)
    assert seen == [(None, True), (None, True)]
    layer(x, attention_mask=left_padding([9, 5], 9))
    assert seen[-1][0] is not None and seen[-1][0].shape == (2, 1, 9, 9)


@pytest.mark.parametrize("lengths", [[11, 11], [11, 6, 1]])
def test_forward_equals_written_out_attention(lengths):
    layer = make()
    T = max(lengths)
    x = torch.randn(len(lengths), T, D, dtype=F64)
    mask = left_padding(lengths, T)
    y, _ = layer(x, attention_mask=mask)
    torch.testing.assert_close(y[mask], reference(layer, x, mask)[mask], atol=1e-13, rtol=1e-11)
    for b, L in enumerate(lengths):  # each row as if alone
        y_b, _ = layer(x[b : b + 1, T - L:])
        torch.testing.assert_close(y[b, T - L:], y_b[0], atol=1e-13, rtol=1e-11)


@pytest.mark.parametrize("lengths", [[12, 12], [12, 7, 3]])
@pytest.mark.parametrize("capacity", [None, 30])
def test_decode_equals_forward_in_preallocated_buffers(lengths, capacity):
    layer = make()
    T, P = max(lengths) + 8, max(lengths)
    x = torch.randn(len(lengths), T, D, dtype=F64)
    mask = left_padding(lengths, P)
    full_mask = torch.cat([mask, torch.ones(len(lengths), T - P, dtype=torch.bool)], 1)
    y_full, _ = layer(x, attention_mask=full_mask)
    _, cache = layer(x[:, :P], attention_mask=mask, use_cache=True, cache_capacity=capacity)
    assert cache.capacity == (capacity or P) and cache.length == P
    ptr, ys = cache.k.data_ptr(), []
    for t in range(P, T):
        y_t, cache = layer.step(x[:, t], cache)
        ys.append(y_t)
    torch.testing.assert_close(torch.stack(ys, 1), y_full[:, P:], atol=1e-13, rtol=1e-11)
    assert cache.length == T
    # within its capacity the cache is written in place; past it, it doubled once
    assert (cache.k.data_ptr() == ptr) == (capacity is not None) and cache.capacity == (capacity or 2 * P)


def test_decode_from_an_empty_cache_equals_forward():
    layer = make()
    x = torch.randn(3, 9, D, dtype=F64)
    y_full, _ = layer(x)
    cache = layer.init_cache(3, dtype=F64)
    ys = []
    for t in range(9):
        y_t, cache = layer.step(x[:, t], cache)
        ys.append(y_t)
    torch.testing.assert_close(torch.stack(ys, 1), y_full, atol=1e-13, rtol=1e-11)
    assert cache.capacity == 16  # 0, 1, 2, 4, 8, 16: doubling


def test_bad_arguments_name_themselves():
    layer = make()
    x = torch.randn(2, 5, D, dtype=F64)
    with pytest.raises(ValueError, match=r"attention_mask must have shape \[2, 5\], got \[2, 4\]"):
        layer(x, attention_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"cache_capacity must be None or an int >= 0, got -1"):
        layer(x, use_cache=True, cache_capacity=-1)
