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
import torch.nn.functional as F
from torch import nn

from momkit.config import ConfigError, MoMConfig
from momkit.layers.checks import check_layer_input
from momkit.layers.conv import ShortConv
from momkit.layers.norm import GatedRMSNorm
from momkit.layers.official import apply_official_options
from momkit.routing import BalanceStats, Dispatch, RoutingPlan, RoutingStats, get_router, load_balancing_loss, z_loss
from momkit.rules import get_rule
from momkit.rules._chunking import gather_rows
from momkit.rules.base import compute_dtype
from momkit.rules.gates import stack_parameters

Tensor = torch.Tensor


def fused_ops(rule, impl: str, x: Tensor) -> bool:
    """The layers' elementwise ops (short convolutions, q/k normalisation, the output norm) run as fused
    Triton kernels where the rule runs its Triton kernels: ``impl`` "triton", or "auto" where the rule's
    kernels can run on ``x`` (a CUDA device, a dtype they take); elsewhere as torch ops."""
    return impl == "triton" or (impl == "auto" and x.is_cuda and rule.triton_unavailable_reason(x) is None)


def grouped_linear(x: Tensor, weight: Tensor, rows: list[tuple[int, int]], ends: Tensor) -> Tensor:
    """``x [N, D]`` whose row ranges ``rows`` (one per group, consecutive from 0 to N; ``ends`` their end rows on
    x's device) go through their own ``weight [G, C, D]`` (as ``F.linear``): ``[N, C]``. One grouped matrix
    product where torch has one for these operands (bfloat16, 16-byte aligned rows; on CUDA from Hopper on),
    otherwise one product per group. Under autocast, in the autocast dtype."""
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    weight = weight.to(x.dtype)
    grouped = (hasattr(torch, "_grouped_mm") and x.dtype == torch.bfloat16 and x.shape[1] % 8 == 0
               and weight.shape[1] % 8 == 0
               and (x.device.type == "cpu" or (x.is_cuda and torch.cuda.get_device_capability(x.device) >= (9, 0))))
    if grouped:
        return torch._grouped_mm(x.contiguous(), weight.transpose(1, 2), offs=ends.to(torch.int32))
    return torch.cat([F.linear(x[a:b], weight[g]) for g, (a, b) in enumerate(rows)])


@dataclass
class MoMCache:
    """Decoding state of one layer, per sequence: every memory's state and convolution tail.
    ``MoMLayer.step`` advances it in place."""

    states: Tensor  # [B, M', *state]   (M' = memories + shared); float32, float64 for float64 models
    tail: Tensor  # [B, M', W-1, 2*H*K + H*V] last q | k | v inputs of each memory's subsequence, oldest first
    counts: Tensor  # [B, M'] tokens each memory has seen (their position for titans' mini-batches)
    position: Tensor  # [B] real tokens seen per sequence


@dataclass
class StackedWeights:
    """Every memory's decoding weights stacked on a memory axis (copies of the per-memory parameters,
    whose layout is unchanged). M' memories (the shared one last), D hidden, W conv width."""

    sources: list[Tensor]  # the parameters and buffers the copies were made from
    key: tuple  # their fingerprint when copied
    proj: Tensor  # [H*K + M' * (H*K + H*V), D]: q_proj, then each memory's k_proj and v_proj
    conv: Tensor | None  # [M', W, 2*H*K + H*V]: q_conv (the same for every memory), k_conv, v_conv taps
    gates: dict[str, Tensor]  # the gate modules' parameters and buffers, [M', ...] (gates.stack_parameters)


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


def _fingerprint(tensors: list[Tensor]) -> tuple:
    return tuple((t.data_ptr(), t._version, t.dtype) for t in tensors)


class MoMLayer(nn.Module):
    def __init__(self, cfg: MoMConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.rule = get_rule(cfg.rule)
        H, K, V, D, M = cfg.num_heads, cfg.key_dim, cfg.value_dim, cfg.hidden_size, cfg.num_memories
        self.q_proj = nn.Linear(D, H * K, bias=False)
        self.router = get_router(cfg.router)(D, M, cfg.topk, cfg.router_noise_std, cfg.router_bias_update_rate,
                                             cfg.router_weights)
        if cfg.single_kv_proj:
            one = MemoryProjections(cfg)
            self.memories = nn.ModuleList([one] * M)
        else:
            self.memories = nn.ModuleList(MemoryProjections(cfg) for _ in range(M))
        if cfg.shared_memory:
            self.shared = self.memories[0] if cfg.shared_uses_routed_proj else MemoryProjections(cfg)
        if cfg.short_conv:
            self.q_conv = ShortConv(H * K, cfg.conv_size)
        self.g_proj = nn.Linear(D, H * V, bias=False)
        self.o_norm = GatedRMSNorm(V, cfg.norm_eps)
        self.o_proj = nn.Linear(H * V, D, bias=False)
        apply_official_options(self, self.all_memories, cfg)
        self._stacked_memo: StackedWeights | None = None  # decoding weights (see _stacked)

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

        fused = fused_ops(self.rule, cfg.impl, x)
        x_rows = disp.gather(x, fused)
        q_in = disp.gather(self.q_proj(x), fused)
        q = self.q_conv.forward_packed(q_in, pos, fused) if cfg.short_conv else q_in
        k_in, v_in, ks, vs, gates = [], [], [], [], {}
        # On the kernel path, fewer launches (a small model's step is bound by their count): every memory's k and
        # v as one grouped projection and one grouped convolution writing k and v apart (not for a rule that makes
        # its key from its gates: its k projection gets no gradient), and every memory's gates in one stacked
        # product over the tokens (per-head gates only: per-channel ones would be computed for M' memories where
        # k' rows read them).
        fuse_kv = fused and self.rule.uses_key
        stacked_gates = fused and bool(self.rule.gates) and not any(spec.per_channel for spec in self.rule.gates)
        conv = cfg.short_conv and not cfg.share_kv_conv  # each memory's own convolutions
        if fuse_kv:
            kv_weights, kv_conv_weights = self._kv_weights(x, conv)
            kv = grouped_linear(x_rows, kv_weights, disp.memory_rows, disp.cu_seqlens[disp.batch:: disp.batch])
            k, v = kv.split([H * K, H * V], -1)
            k_in.append(k)
            v_in.append(v)
            if conv:
                from momkit.kernels.short_conv import short_conv

                k, v = short_conv(kv, kv_conv_weights, pos, groups=disp.memory_rows, split=H * K)
        if not fuse_kv or not stacked_gates:
            # one split, not a slice per memory: the split's backward writes every memory's gradient of its rows
            # into one tensor, where slices would each make a zero tensor of all rows and add them up
            x_parts = torch.split(x_rows, [b - a for a, b in disp.memory_rows])
            for mem, (a, b), xm in zip(self.all_memories, disp.memory_rows, x_parts, strict=True):
                if a == b:
                    continue
                if not fuse_kv:
                    km, vm = mem.k_proj(xm), mem.v_proj(xm)
                    k_in.append(km)
                    v_in.append(vm)
                    if conv:
                        km = mem.k_conv.forward_packed(km, pos[a:b], fused)
                        vm = mem.v_conv.forward_packed(vm, pos[a:b], fused)
                    ks.append(km)
                    vs.append(vm)
                if not stacked_gates:
                    for n, g in mem.gates(xm[None]).items():
                        gates.setdefault(n, []).append(g)
        N = disp.num_rows
        if not fuse_kv:
            k, v = torch.cat(ks), torch.cat(vs)
        if cfg.short_conv and cfg.share_kv_conv:  # one convolution for every memory: one call over all rows
            first = self.all_memories[0]
            k, v = first.k_conv.forward_packed(k, pos, fused), first.v_conv.forward_packed(v, pos, fused)
        q, k = self.rule.prepare_qk(q.view(1, N, H, K), k.view(1, N, H, K), fused)
        v = v.view(1, N, H, V)
        gates = self._gate_rows(x, disp) if stacked_gates else {n: torch.cat(g, 1) for n, g in gates.items()}
        o_rows, final = self.rule.forward(
            q, k, v, impl=cfg.impl, chunk_size=cfg.chunk_size, cu_seqlens=disp.offsets,
            output_final_state=use_cache, **gates, **cfg.rule_options,
        )
        # squeeze, not [0]: a select's backward writes its gradient into a zero tensor of the whole input
        o = disp.combine(o_rows.squeeze(0), fused)  # [B, T, H, V]
        y = self._output(x, o, fused)

        balance = BalanceStats.from_plan(plan, mask)
        zero = x.new_zeros((), dtype=torch.float32)
        aux_loss = cfg.aux_loss_scale * load_balancing_loss([balance]) if balance is not None else zero
        zl = cfg.z_loss_scale * z_loss(plan.logits, mask) if plan.logits is not None else zero
        aux = MoMAux(aux_loss, zl, balance, RoutingStats.from_plan(plan, mask), plan)
        if use_cache:
            aux.cache = self._prefill_cache(disp, final, q_in, torch.cat(k_in), torch.cat(v_in), mask)
        return y, aux

    def _kv_weights(self, x: Tensor, conv: bool) -> tuple[Tensor, Tensor | None]:
        """Every memory's k | v projection weight ``[M', C, D]`` and, with ``conv``, k | v convolution weight
        ``[M', C, W]``: one concatenation (and, under autocast, one cast to the autocast dtype) for every memory,
        and one of each in the backward."""
        mems, width = self.all_memories, self.cfg.num_heads * (self.cfg.key_dim + self.cfg.value_dim)
        proj = torch.cat([w for m in mems for w in (m.k_proj.weight, m.v_proj.weight)])
        if torch.is_autocast_enabled(x.device.type):
            proj = proj.to(torch.get_autocast_dtype(x.device.type))
        convs = torch.cat([w for m in mems for w in (m.k_conv.weight, m.v_conv.weight)]) if conv else None
        G = len(mems)
        return proj.view(G, width, -1), None if convs is None else convs.view(G, width, -1)

    def _gate_rows(self, x: Tensor, disp: Dispatch) -> dict[str, Tensor]:
        """Every memory's gates for every token in one stacked product, then each row's own: ``[1, N, H]``."""
        mems = self.all_memories
        every = mems[0].gates.forward_stacked(stack_parameters([m.gates for m in mems]), x.flatten(0, 1))
        row = disp.token * len(mems) + torch.div(disp.segment, disp.batch, rounding_mode="floor")
        return {n: gather_rows(g.flatten(0, 1), row)[None] for n, g in every.items()}  # (token, memory): no repeats

    def _output(self, x: Tensor, o: Tensor, fused: bool = False) -> Tensor:
        cfg = self.cfg
        gate = self.g_proj(x).view(*x.shape[:-1], cfg.num_heads, cfg.value_dim)
        return self.o_proj(self.o_norm(o.to(x.dtype), gate, fused).flatten(-2))

    # ----------------------------------------------------------------------------------- decoding
    def _prefill_cache(self, disp: Dispatch, final: Tensor, q_in, k_in, v_in, mask: Tensor) -> MoMCache:
        B, Mp, W = disp.batch, disp.num_segments_per_seq, self.cfg.conv_size
        self._stacked_memo = None  # a new cache restacks the decoding weights (see _stacked)

        def per_memory(t: Tensor) -> Tensor:  # [M' * B, ...] (segment order) -> [B, M', ...]
            return t.view(Mp, B, *t.shape[1:]).transpose(0, 1).contiguous()

        tail = per_memory(torch.cat([disp.segment_tail(r, W - 1) for r in (q_in, k_in, v_in)], -1))
        counts = per_memory(disp.cu_seqlens.diff())
        return MoMCache(per_memory(final), tail, counts, mask.sum(1))

    def init_cache(self, batch_size: int, device: torch.device | str | None = None,
                   dtype: torch.dtype = torch.float32) -> MoMCache:
        """An empty cache (decoding from the first token). ``dtype``: the model's; states are float32
        (float64 for float64 models)."""
        cfg = self.cfg
        Mp, W, H, K, V = len(self.all_memories), cfg.conv_size, cfg.num_heads, cfg.key_dim, cfg.value_dim
        self._stacked_memo = None
        states = self.rule.init_state(batch_size * Mp, H, K, V, dtype=compute_dtype(dtype), device=device)
        return MoMCache(states.view(batch_size, Mp, *states.shape[1:]),
                        torch.zeros(batch_size, Mp, W - 1, 2 * H * K + H * V, device=device, dtype=dtype),
                        torch.zeros(batch_size, Mp, dtype=torch.long, device=device),
                        torch.zeros(batch_size, dtype=torch.long, device=device))

    def _stacked(self) -> StackedWeights:
        """The decoding weights of every memory, stacked. Without gradients they are built once and kept
        until a tensor they were copied from changes (its storage, dtype or autograd version counter: any
        in-place update such as an optimizer step or ``load_state_dict``) or a new cache is made (which also
        picks up parameters replaced by new objects); with gradients they are stacked afresh on each call."""
        memo = self._stacked_memo
        if memo is not None and not torch.is_grad_enabled() and memo.key == _fingerprint(memo.sources):
            return memo
        cfg, mems = self.cfg, self.all_memories
        sources = [*self.q_proj.parameters(), *(self.q_conv.parameters() if cfg.short_conv else ()),
                   *(t for m in mems for t in (*m.parameters(), *m.buffers()))]
        proj = torch.cat([self.q_proj.weight, *(w for m in mems for w in (m.k_proj.weight, m.v_proj.weight))])
        conv = None
        if cfg.short_conv:
            conv = torch.stack([torch.cat([self.q_conv.weight, m.k_conv.weight, m.v_conv.weight]).T for m in mems])
        stacked = StackedWeights(sources, _fingerprint(sources), proj, conv, stack_parameters([m.gates for m in mems]))
        if not any(t.requires_grad for t in (proj, *stacked.gates.values())):  # a copy, not part of a graph
            self._stacked_memo = stacked
        return stacked

    def step(self, x: Tensor, cache: MoMCache, token_ids: Tensor | None = None) -> tuple[Tensor, MoMCache]:
        """One decoding token: x [B, D] -> (y [B, D], cache), the cache advanced in place.

        One batched computation over memories: the projections of every memory in one matrix product
        (weights stacked by ``_stacked``), the gates of every memory at once, then the short convolution
        and the rule step of the B * k' selected (sequence, memory) pairs in one call each; the selected
        states, tails and counts are written back into the cache (a slot the plan does not keep, e.g.
        under an analysis hook on the router, writes nothing). Every sequence gets a real token.
        Capacity limits apply to whole-sequence forward passes only (a step cannot know the final
        length); decoding routes without dropping."""
        cfg = self.cfg
        B = x.shape[0]
        H, K, V = cfg.num_heads, cfg.key_dim, cfg.value_dim
        Mp = len(self.all_memories)
        ones = torch.ones(B, 1, dtype=torch.bool, device=x.device)
        if self.router.needs_token_ids and token_ids is None:
            raise ConfigError(f"router={cfg.router!r} needs token_ids (MoMLM passes input_ids); got None")
        plan = self.router(x[:, None], ones, cache.position[:, None],
                           None if token_ids is None else token_ids.view(B, 1))
        idx, w, kept = (t[:, 0] for t in self._slots(plan, ones))  # [B, k']
        n = idx.shape[1]
        rows = torch.arange(B, device=x.device)[:, None]  # with idx: the selected (sequence, memory) pairs

        st = self._stacked()
        proj = F.linear(x, st.proj)  # [B, H*K + M' * (H*K + H*V)]: q, then each memory's k and v
        q_in, kv_in = proj[:, : H * K], proj[:, H * K :].view(B, Mp, H * (K + V))
        qkv = torch.cat([q_in[:, None].expand(B, n, H * K), kv_in[rows, idx]], -1)  # [B, k', 2HK + HV]
        if cfg.short_conv:
            window = torch.cat([cache.tail[rows, idx], qkv[:, :, None].to(cache.tail.dtype)], 2)  # [B, k', W, C]
            qkv = F.silu((window * st.conv[idx]).sum(2))
            cache.tail[rows, idx] = torch.where(kept[..., None, None], window[:, :, 1:], window[:, :, :-1])
        q, k, v = qkv.split([H * K, H * K, H * V], -1)
        q, k = self.rule.prepare_qk(q.reshape(B * n, H, K), k.reshape(B * n, H, K))
        gates = self.all_memories[0].gates.forward_stacked(st.gates, x)  # [B, M', H(, K)]
        gates = {name: g[rows, idx].flatten(0, 1) for name, g in gates.items()}
        # the selected states are updated where they live: cache.states seen as [B * M', *state]
        if not cache.states.is_contiguous():
            cache.states = cache.states.contiguous()
        states = cache.states.view(B * Mp, *cache.states.shape[2:])
        o = self.rule.step_into(q, k, v.reshape(B * n, H, V), states, (rows * Mp + idx).flatten(), kept.flatten(),
                                position=cache.counts[rows, idx].flatten(), **gates, **cfg.rule_options)
        cache.counts[rows, idx] += kept.long()
        cache.position += 1
        dt = torch.promote_types(x.dtype, torch.float32)
        out = (w.to(dt)[..., None, None] * o.view(B, n, H, V).to(dt)).sum(1)  # [B, H, V]
        return self._output(x[:, None], out[:, None])[:, 0], cache
