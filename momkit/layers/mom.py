"""The Mixture-of-Memories layer (Du et al. 2025, arXiv 2502.13685), for every update rule.

    x [B, T, D] -> q = W_q x (shared)                  router: x -> plan (indices, weights [B, T, k])
                -> memory m: k^m = W_k^m x, v^m = W_v^m x, gates^m = G^m(x) on the tokens routed to m
                -> memory m runs its rule over its own tokens, in order, from its own state
                -> o_t = sum_j w_tj o_t^{m_j}  (+ o_t^shared: every token, weight 1)
                -> per-head gated RMSNorm (gate from x) -> W_o

The short convolution (on q, k, v) runs on each memory's own subsequence. Dispatch and combine live
in ``momkit.routing.dispatch``: one rule call covers every memory of every sequence.
Axis letters: B batch, T time, D hidden, H heads, K key dim, V value dim, M memories (+1 shared).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from momkit.config import ConfigError, MoMConfig
from momkit.layers.checks import check_layer_input
from momkit.layers.conv import ShortConv
from momkit.layers.norm import GatedRMSNorm
from momkit.routing import BalanceStats, Dispatch, RoutingPlan, RoutingStats, get_router, load_balancing_loss, z_loss
from momkit.rules import get_rule

Tensor = torch.Tensor


@dataclass
class MoMCache:
    """Decoding state of one layer: every memory's state and convolution tails, per sequence."""

    states: Tensor  # [B, M', *state]   (M' = memories + shared)
    q_tail: Tensor  # [B, M', W-1, H*K]  last q inputs of each memory's subsequence
    k_tail: Tensor  # [B, M', W-1, H*K]
    v_tail: Tensor  # [B, M', W-1, H*V]
    counts: Tensor  # [B, M'] tokens each memory has seen (their position for titans' mini-batches)
    position: Tensor  # [B] real tokens seen per sequence


@dataclass
class MoMAux:
    """What a MoM layer reports besides its output."""

    aux_loss: Tensor  # load-balancing loss of this layer, scaled by aux_loss_scale
    z_loss: Tensor  # router z-loss, scaled by z_loss_scale
    balance: BalanceStats | None  # sums for a model-wide (global) balancing loss
    stats: RoutingStats
    plan: RoutingPlan
    cache: MoMCache | None = None


class MemoryProjections(nn.Module):
    """One memory's own maps: k, v projections, their short convolutions, and the rule's gates."""

    def __init__(self, cfg: MoMConfig):
        super().__init__()
        H, K, V, D = cfg.num_heads, cfg.key_dim, cfg.value_dim, cfg.hidden_size
        self.k_proj = nn.Linear(D, H * K, bias=False)
        self.v_proj = nn.Linear(D, H * V, bias=False)
        self.gates = get_rule(cfg.rule).gate_module(D, H, K)
        if cfg.short_conv:
            self.k_conv, self.v_conv = ShortConv(H * K, cfg.conv_size), ShortConv(H * V, cfg.conv_size)


class MoMLayer(nn.Module):
    def __init__(self, cfg: MoMConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.rule = get_rule(cfg.rule)
        H, K, V, D, M = cfg.num_heads, cfg.key_dim, cfg.value_dim, cfg.hidden_size, cfg.num_memories
        self.q_proj = nn.Linear(D, H * K, bias=False)
        self.router = get_router(cfg.router)(D, M, cfg.topk, cfg.router_noise_std, cfg.router_bias_update_rate)
        if cfg.single_kv_proj:
            one = MemoryProjections(cfg)
            self.memories = nn.ModuleList([one] * M)
        else:
            self.memories = nn.ModuleList(MemoryProjections(cfg) for _ in range(M))
        if cfg.shared_memory:
            self.shared = MemoryProjections(cfg)
        if cfg.short_conv:
            self.q_conv = ShortConv(H * K, cfg.conv_size)
        self.g_proj = nn.Linear(D, H * V, bias=False)
        self.o_norm = GatedRMSNorm(V, cfg.norm_eps)
        self.o_proj = nn.Linear(H * V, D, bias=False)

    @property
    def all_memories(self) -> list[MemoryProjections]:
        return list(self.memories) + ([self.shared] if self.cfg.shared_memory else [])

    # ----------------------------------------------------------------------------------- routing
    def route(self, x: Tensor, attention_mask: Tensor | None = None, token_ids: Tensor | None = None) -> RoutingPlan:
        """The routing plan for x [B, T, D] (capacity applied), without running the memories."""
        mask = self._mask(x, attention_mask)
        positions = (mask.long().cumsum(1) - 1).clamp_min(0)
        if self.router.needs_token_ids and token_ids is None:
            raise ConfigError(f"router={self.cfg.router!r} needs token_ids (MoMLM passes input_ids); got None")
        plan = self.router(x, mask, positions, token_ids)
        if self.cfg.capacity_factor is not None:
            plan = plan.apply_capacity(self.cfg.capacity_factor, mask.sum(1))
        return plan

    @staticmethod
    def _mask(x: Tensor, attention_mask: Tensor | None) -> Tensor:
        if attention_mask is None:
            return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        if attention_mask.shape != x.shape[:2]:
            raise ValueError(f"attention_mask must have shape {list(x.shape[:2])}, got {list(attention_mask.shape)}")
        return attention_mask.bool()

    def _slots(self, plan: RoutingPlan, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Routed slots plus, with a shared memory, one slot per real token (index M, weight 1)."""
        idx, w, kept = plan.indices, plan.weights, plan.kept
        if self.cfg.shared_memory:
            M = self.cfg.num_memories
            idx = torch.cat([idx, torch.full_like(idx[..., :1], M)], -1)
            w = torch.cat([w, mask[..., None].to(w.dtype)], -1)
            kept = torch.cat([kept, mask[..., None]], -1)
        return idx, w, kept

    # ----------------------------------------------------------------------------------- forward
    def forward(self, x: Tensor, attention_mask: Tensor | None = None, token_ids: Tensor | None = None,
                use_cache: bool = False) -> tuple[Tensor, MoMAux]:
        """x [B, T, D]; attention_mask [B, T] (1 = real token; left padding); token_ids [B, T] for the
        hash router. Returns (y [B, T, D], MoMAux); with use_cache, aux.cache is ready for ``step``."""
        check_layer_input(x, attention_mask, self.cfg.hidden_size, "MoMLayer.forward")
        cfg = self.cfg
        H, K, V = cfg.num_heads, cfg.key_dim, cfg.value_dim
        mask = self._mask(x, attention_mask)
        plan = self.route(x, attention_mask, token_ids)
        disp = Dispatch.build(*self._slots(plan, mask), len(self.all_memories))
        pos = disp.position

        x_rows = disp.gather(x)
        q_in = disp.gather(self.q_proj(x))
        q = self.q_conv.forward_packed(q_in, pos) if cfg.short_conv else q_in
        k_in, v_in, ks, vs, gates = [], [], [], [], {}
        for mem, (a, b) in zip(self.all_memories, disp.memory_rows):
            if a == b:
                continue
            xm = x_rows[a:b]
            km, vm = mem.k_proj(xm), mem.v_proj(xm)
            k_in.append(km)
            v_in.append(vm)
            if cfg.short_conv:
                km, vm = mem.k_conv.forward_packed(km, pos[a:b]), mem.v_conv.forward_packed(vm, pos[a:b])
            ks.append(km)
            vs.append(vm)
            for n, g in mem.gates(xm[None]).items():
                gates.setdefault(n, []).append(g)
        N = disp.num_rows
        q, k = self.rule.prepare_qk(q.view(1, N, H, K), torch.cat(ks).view(1, N, H, K))
        v = torch.cat(vs).view(1, N, H, V)
        gates = {n: torch.cat(g, 1) for n, g in gates.items()}
        o_rows, final = self.rule.forward(
            q, k, v, impl=cfg.impl, chunk_size=cfg.chunk_size, cu_seqlens=disp.cu_seqlens,
            output_final_state=use_cache, **gates, **cfg.rule_options,
        )
        o = disp.combine(o_rows[0])  # [B, T, H, V]
        y = self._output(x, o)

        balance = BalanceStats.from_plan(plan, mask)
        zero = x.new_zeros((), dtype=torch.float32)
        aux_loss = cfg.aux_loss_scale * load_balancing_loss([balance]) if balance is not None else zero
        zl = cfg.z_loss_scale * z_loss(plan.logits, mask) if plan.logits is not None else zero
        aux = MoMAux(aux_loss, zl, balance, RoutingStats.from_plan(plan, mask), plan)
        if use_cache:
            aux.cache = self._prefill_cache(disp, final, q_in, torch.cat(k_in), torch.cat(v_in), mask)
        return y, aux

    def _output(self, x: Tensor, o: Tensor) -> Tensor:
        cfg = self.cfg
        gate = self.g_proj(x).view(*x.shape[:-1], cfg.num_heads, cfg.value_dim)
        return self.o_proj(self.o_norm(o.to(x.dtype), gate).flatten(-2))

    # ----------------------------------------------------------------------------------- decoding
    def _prefill_cache(self, disp: Dispatch, final: Tensor, q_in, k_in, v_in, mask: Tensor) -> MoMCache:
        B, Mp, W = disp.batch, disp.num_segments_per_seq, self.cfg.conv_size

        def per_memory(t: Tensor) -> Tensor:  # [M' * B, ...] (segment order) -> [B, M', ...]
            return t.view(Mp, B, *t.shape[1:]).transpose(0, 1).contiguous()

        tails = [per_memory(disp.segment_tail(r, W - 1)) for r in (q_in, k_in, v_in)]
        counts = per_memory(disp.cu_seqlens.diff())
        return MoMCache(per_memory(final), *tails, counts, mask.sum(1))

    def init_cache(self, batch_size: int, device=None, dtype=torch.float32) -> MoMCache:
        """An empty cache (decoding from the first token)."""
        cfg = self.cfg
        Mp, W, H, K, V = len(self.all_memories), cfg.conv_size, cfg.num_heads, cfg.key_dim, cfg.value_dim
        states = self.rule.init_state(batch_size * Mp, H, K, V, device=device)
        z = lambda c: torch.zeros(batch_size, Mp, W - 1, c, device=device, dtype=dtype)  # noqa: E731
        return MoMCache(states.view(batch_size, Mp, *states.shape[1:]), z(H * K), z(H * K), z(H * V),
                        torch.zeros(batch_size, Mp, dtype=torch.long, device=device),
                        torch.zeros(batch_size, dtype=torch.long, device=device))

    def step(self, x: Tensor, cache: MoMCache, token_ids: Tensor | None = None) -> tuple[Tensor, MoMCache]:
        """One decoding token: x [B, D] -> (y [B, D], new cache). Every sequence gets a real token.
        Capacity limits apply to whole-sequence forward passes only (a step cannot know the final
        length); decoding routes without dropping."""
        cfg = self.cfg
        B = x.shape[0]
        H, K, V = cfg.num_heads, cfg.key_dim, cfg.value_dim
        ones = torch.ones(B, 1, dtype=torch.bool, device=x.device)
        if self.router.needs_token_ids and token_ids is None:
            raise ConfigError(f"router={cfg.router!r} needs token_ids (MoMLM passes input_ids); got None")
        plan = self.router(x[:, None], ones, cache.position[:, None],
                           None if token_ids is None else token_ids.view(B, 1))
        idx, w, kept = (t[:, 0] for t in self._slots(plan, ones))  # [B, k']
        Mp = len(self.all_memories)
        weight = torch.zeros(B, Mp, dtype=w.dtype, device=x.device).scatter_add(1, idx, w * kept)
        selected = torch.zeros(B, Mp, dtype=torch.bool, device=x.device).scatter(1, idx, kept)

        q_in = self.q_proj(x)
        out = torch.zeros(B, H, V, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
        new = {n: [] for n in ("states", "q_tail", "k_tail", "v_tail")}
        for m, mem in enumerate(self.all_memories):
            k_in, v_in = mem.k_proj(x), mem.v_proj(x)
            q, k, v = q_in, k_in, v_in
            tails = (cache.q_tail[:, m], cache.k_tail[:, m], cache.v_tail[:, m])
            if cfg.short_conv:
                (q, tq), (k, tk), (v, tv) = (conv.step(inp, tail) for conv, inp, tail in
                                             zip((self.q_conv, mem.k_conv, mem.v_conv), (q_in, k_in, v_in), tails))
            else:
                tq, tk, tv = tails
            q, k = self.rule.prepare_qk(q.view(B, 1, H, K), k.view(B, 1, H, K))
            gates = {n: g[:, 0] for n, g in mem.gates(x[:, None]).items()}
            o_m, S_m = self.rule.step(q[:, 0], k[:, 0], v.view(B, H, V), cache.states[:, m],
                                      position=cache.counts[:, m], **gates, **cfg.rule_options)
            out = out + weight[:, m, None, None].to(out.dtype) * o_m.to(out.dtype)
            sel = selected[:, m]
            new["states"].append(torch.where(sel.view(B, *[1] * (S_m.dim() - 1)), S_m, cache.states[:, m]))
            for name, t_new, t_old in zip(("q_tail", "k_tail", "v_tail"), (tq, tk, tv), tails):
                new[name].append(torch.where(sel.view(B, 1, 1), t_new, t_old))
        cache = MoMCache(**{n: torch.stack(t, 1) for n, t in new.items()},
                         counts=cache.counts + selected.long(), position=cache.position + 1)
        return self._output(x[:, None], out[:, None])[:, 0], cache
