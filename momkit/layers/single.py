"""The single-memory layer: one rule over the whole sequence (the MoM paper's baseline).

The same parts as MoMLayer with one memory and no router: shared query projection, the memory's k, v
projections, short convolutions and gates, the rule, per-head gated RMSNorm and the output
projection. It is written directly (no dispatch), so that ``MoMLayer(num_memories=1, topk=1,
shared_memory=False)`` can be checked against it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from momkit.config import MoMConfig
from momkit.layers.checks import check_layer_input
from momkit.layers.conv import ShortConv
from momkit.layers.mom import MemoryProjections, fused_ops
from momkit.layers.norm import GatedRMSNorm
from momkit.layers.official import apply_official_options
from momkit.rules import get_rule
from momkit.rules.base import compute_dtype
from momkit.rules.gates import one_stacked

Tensor = torch.Tensor


@dataclass
class SingleCache:
    """Decoding state of one layer; ``SingleMemoryLayer.step`` advances it in place."""

    state: Tensor  # [B, *state]
    q_tail: Tensor  # [B, W-1, H*K]
    k_tail: Tensor
    v_tail: Tensor
    position: Tensor  # [B]


class SingleMemoryLayer(nn.Module):
    def __init__(self, cfg: MoMConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.rule = get_rule(cfg.rule)
        H, K, V, D = cfg.num_heads, cfg.key_dim, cfg.value_dim, cfg.hidden_size
        self.q_proj = nn.Linear(D, H * K, bias=False)
        self.memory = MemoryProjections(cfg)
        if cfg.short_conv:
            self.q_conv = ShortConv(H * K, cfg.conv_size)
        self.g_proj = nn.Linear(D, H * V, bias=False)
        self.o_norm = GatedRMSNorm(V, cfg.norm_eps)
        self.o_proj = nn.Linear(H * V, D, bias=False)
        apply_official_options(self, [self.memory], cfg)

    def forward(self, x: Tensor, attention_mask: Tensor | None = None, token_ids: Tensor | None = None,
                use_cache: bool = False) -> tuple[Tensor, SingleCache | None]:
        check_layer_input(x, attention_mask, self.cfg.hidden_size, "SingleMemoryLayer.forward")
        cfg, mem = self.cfg, self.memory
        B, T, _ = x.shape
        H, K, V = cfg.num_heads, cfg.key_dim, cfg.value_dim
        mask = torch.ones(B, T, dtype=torch.bool, device=x.device) if attention_mask is None else attention_mask.bool()
        f = fused_ops(self.rule, cfg.impl, x)
        widths = [H * K, H * K, H * V]
        # On the kernel path q, k and v are one projection and one convolution (fewer launches; not for a rule
        # that makes its key from its gates: its k projection gets no gradient)
        fuse = f and self.rule.uses_key
        if fuse:
            qkv_in = F.linear(x, torch.cat([self.q_proj.weight, mem.k_proj.weight, mem.v_proj.weight]))
        else:
            q_in, k_in, v_in = (p(x) for p in (self.q_proj, mem.k_proj, mem.v_proj))
        if attention_mask is not None:  # padded positions (left padding) feed zeros: a fresh start for the conv
            keep = mask[..., None].to(x.dtype)
            if fuse:
                qkv_in = qkv_in * keep
            else:
                q_in, k_in, v_in = q_in * keep, k_in * keep, v_in * keep
        if fuse:
            q_in, k_in, v_in = qkv_in.split(widths, -1)
            q, k, v = q_in, k_in, v_in
            if cfg.short_conv:  # q, k and v come out as three contiguous tensors: nothing copies a strided slice
                from momkit.kernels.short_conv import short_conv

                weight = torch.cat([self.q_conv.weight, mem.k_conv.weight, mem.v_conv.weight])
                position = torch.arange(T, device=x.device).repeat(B)
                q, k, v = (t.view(B, T, -1) for t in short_conv(qkv_in.reshape(B * T, -1), weight, position,
                                                                split=(H * K, 2 * H * K)))
        else:
            q, k, v = q_in, k_in, v_in
            if cfg.short_conv:
                q, k, v = (c.forward_dense(t, f) for c, t in ((self.q_conv, q), (mem.k_conv, k), (mem.v_conv, v)))
        q, k = self.rule.prepare_qk(q.view(B, T, H, K), k.view(B, T, H, K), f)
        v = v.view(B, T, H, V)
        if f:  # the stacked form of one module: the gated rules' projections as one product
            gates = {n: t.view(B, T, *t.shape[2:])
                     for n, t in mem.gates.forward_stacked(one_stacked(mem.gates), x.flatten(0, 1)).items()}
        else:
            gates = mem.gates(x)
        kw = dict(impl=cfg.impl, chunk_size=cfg.chunk_size, output_final_state=use_cache, **cfg.rule_options)
        if attention_mask is None or bool(mask.all()):
            o, final = self.rule.forward(q, k, v, **gates, **kw)
        else:  # run only the real tokens of each sequence, packed
            lengths = mask.sum(1)
            cu = torch.zeros(B + 1, dtype=torch.int64, device=x.device)
            cu[1:] = lengths.cumsum(0)
            pack = lambda t: t[mask][None]  # noqa: E731
            o_p, final = self.rule.forward(pack(q), pack(k), pack(v), cu_seqlens=cu,
                                           **{n: pack(g) for n, g in gates.items()}, **kw)
            o = o_p.new_zeros(B, T, H, V)
            o[mask] = o_p[0]
        gate = self.g_proj(x).view(B, T, H, V)
        y = self.o_proj(self.o_norm(o.to(x.dtype), gate, f).flatten(-2))
        cache = None
        if use_cache:
            W = cfg.conv_size
            tail = lambda t: torch.nn.functional.pad(t, (0, 0, W - 1, 0))[:, -(W - 1):] if W > 1 else t[:, :0]  # noqa: E731
            cache = SingleCache(final, tail(q_in), tail(k_in), tail(v_in), mask.sum(1))
        return y, cache

    def step(self, x: Tensor, cache: SingleCache, token_ids: Tensor | None = None) -> tuple[Tensor, SingleCache]:
        """One decoding token: x [B, D] -> (y [B, D], cache), the cache advanced in place."""
        cfg, mem = self.cfg, self.memory
        B = x.shape[0]
        H, K, V = cfg.num_heads, cfg.key_dim, cfg.value_dim
        q, k, v = self.q_proj(x), mem.k_proj(x), mem.v_proj(x)
        tails = (cache.q_tail, cache.k_tail, cache.v_tail)
        if cfg.short_conv:
            (q, tq), (k, tk), (v, tv) = (c.step(i, t) for c, i, t in zip((self.q_conv, mem.k_conv, mem.v_conv),
                                                                        (q, k, v), tails))
        else:
            tq, tk, tv = tails
        q, k = self.rule.prepare_qk(q.view(B, 1, H, K), k.view(B, 1, H, K))
        gates = {n: g[:, 0] for n, g in mem.gates(x[:, None]).items()}
        o, S = self.rule.step(q[:, 0], k[:, 0], v.view(B, H, V), cache.state, position=cache.position,
                              **gates, **cfg.rule_options)
        y = self.o_proj(self.o_norm(o.to(x.dtype), self.g_proj(x).view(B, H, V)).flatten(-2))
        # in place, so that a captured decoding step (momkit.models.graphs) reads and writes the same buffers
        for buf, new in zip((cache.state, cache.q_tail, cache.k_tail, cache.v_tail), (S, tq, tk, tv)):
            if buf is not new:
                buf.copy_(new)
        cache.position += 1
        return y, cache

    def init_cache(self, batch_size: int, device=None, dtype=torch.float32) -> SingleCache:
        cfg = self.cfg
        H, K, V, W = cfg.num_heads, cfg.key_dim, cfg.value_dim, cfg.conv_size
        z = lambda c: torch.zeros(batch_size, W - 1, c, device=device, dtype=dtype)  # noqa: E731
        return SingleCache(self.rule.init_state(batch_size, H, K, V, dtype=compute_dtype(dtype), device=device),
                           z(H * K), z(H * K), z(H * V),
                           torch.zeros(batch_size, dtype=torch.long, device=device))
