"""MoMLM: a language model whose mixers are MoM layers (or single-memory layers, or attention).

    embedding -> blocks [RMSNorm -> mixer -> residual -> RMSNorm -> SwiGLU MLP -> residual]
              -> RMSNorm -> head (tied to the embedding by default)

``labels`` are aligned with positions: ``labels[b, t]`` is the target of the prediction made at
position t (-100: not supervised). For next-token prediction pass ``input_ids[:, 1:]`` padded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from momkit.config import LMConfig
from momkit.layers import CausalAttention, MoMAux, MoMLayer, RMSNorm, SingleMemoryLayer
from momkit.layers.mom import fused_ops
from momkit.routing import BalanceStats, RoutingStats, load_balancing_loss
from momkit.rules import get_rule
from momkit.rules.base import upcast

Tensor = torch.Tensor


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, ratio: float):
        super().__init__()
        inner = max(1, round(hidden_size * ratio))
        self.up = nn.Linear(hidden_size, 2 * inner, bias=False)
        self.down = nn.Linear(inner, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.up(x).chunk(2, -1)
        return self.down(F.silu(a) * b)


class Block(nn.Module):
    def __init__(self, cfg: LMConfig, layer: int):
        super().__init__()
        self.kind = cfg.mixer_of(layer)
        self.norm1, self.norm2 = RMSNorm(cfg.hidden_size, cfg.norm_eps), RMSNorm(cfg.hidden_size, cfg.norm_eps)
        mom = cfg.resolved_mom()
        if self.kind == "mom":
            self.mixer = MoMLayer(mom)
        elif self.kind == "single":
            self.mixer = SingleMemoryLayer(mom)
        else:
            heads = cfg.attention_heads if cfg.attention_heads is not None else mom.num_heads
            self.mixer = CausalAttention(cfg.hidden_size, heads, cfg.rope_theta)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.mlp_ratio)

    def forward(self, x, attention_mask, token_ids, use_cache, cache_capacity=None, fused: bool = False):
        """``fused``: the norms as Triton kernels (where the mixers run theirs, see ``MoMLM.forward``)."""
        kw = {"cache_capacity": cache_capacity} if self.kind == "attention" else {}  # KV slots to preallocate
        h, extra = self.mixer(self.norm1(x, fused), attention_mask, token_ids, use_cache=use_cache, **kw)
        x = x + h
        return x + self.mlp(self.norm2(x, fused)), extra

    def step(self, x, cache, token_ids):
        h, cache = self.mixer.step(self.norm1(x), cache, token_ids)
        x = x + h
        return x + self.mlp(self.norm2(x)), cache


@dataclass
class LMOutput:
    logits: Tensor  # [B, T, vocab]
    loss: Tensor | None  # cross-entropy over labels != -100, plus aux_loss
    aux_loss: Tensor  # summed router losses (balance + z), already scaled
    ce_loss: Tensor | None = None
    routing: list[RoutingStats | None] = field(default_factory=list)  # per layer (None: not a MoM layer)
    aux: list[MoMAux | None] = field(default_factory=list)
    cache: list | None = None


class MoMLM(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        mom = cfg.resolved_mom()
        if mom.init == "fla":  # fla's model keeps its MoM layers' own init (momkit.layers.official)
            from momkit.layers.official import fla_init

            for block in self.blocks:
                if block.kind in ("mom", "single"):
                    fla_init(block.mixer)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight

    def _init_weights(self, m: nn.Module) -> None:
        # weights only: gate modules set their own biases and decay parameters (see rules/gates.py)
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=self.cfg.initializer_range)

    def forward(self, input_ids: Tensor, labels: Tensor | None = None, attention_mask: Tensor | None = None,
                use_cache: bool = False, cache_capacity: int | None = None,
                last_logits_only: bool = False, global_sum: Callable[[Tensor], Tensor] | None = None) -> LMOutput:
        """``use_cache``: also return the decoding cache of every layer (``out.cache``, for ``step``);
        ``cache_capacity``: token slots to preallocate in attention layers' KV caches (default: the input
        length; a full cache doubles); ``last_logits_only``: logits of the last position only
        ([B, 1, vocab], what decoding needs; not with labels); ``global_sum``: data-parallel training
        (``DataParallel.global_sum``): this batch is one shard of a global batch, and the cross-entropy,
        z-loss and balancing loss are taken over the global batch (token counts and balance statistics
        summed over ranks in one collective)."""
        if last_logits_only and labels is not None:
            raise ValueError("last_logits_only=True computes no loss: pass labels=None")
        x = self.embed(input_ids)
        mom = self.cfg.mom
        fused = fused_ops(get_rule(mom.rule), mom.impl, x)  # the norms on the kernel path of the mixers
        extras = []
        for block in self.blocks:
            x, extra = block(x, attention_mask, input_ids, use_cache, cache_capacity, fused)
            extras.append(extra)
        logits = self.head(self.norm(x[:, -1:] if last_logits_only else x, fused))
        moms = [e if isinstance(e, MoMAux) else None for e in extras]
        auxes, ce = [a for a in moms if a is not None], None
        if global_sum is not None:
            auxes, ce = self._global_losses(auxes, logits, labels, attention_mask, global_sum)
        elif labels is not None:
            ce = F.cross_entropy(upcast(logits.flatten(0, 1)), labels.flatten(), ignore_index=-100)
        aux_loss = self._aux_loss(auxes, x)
        out = LMOutput(logits=logits, loss=None, aux_loss=aux_loss, routing=[a.stats if a else None for a in moms],
                       aux=moms)
        if labels is not None:
            out.ce_loss, out.loss = ce, ce + aux_loss
        if use_cache:
            out.cache = [e.cache if isinstance(e, MoMAux) else e for e in extras]
        return out

    def _global_losses(self, auxes: list[MoMAux], logits: Tensor, labels: Tensor | None,
                       attention_mask: Tensor | None, global_sum: Callable[[Tensor], Tensor],
                       ) -> tuple[list[MoMAux], Tensor | None]:
        """The layers' router losses and the cross-entropy over the global batch of a data-parallel step:
        this rank's sums (tokens, supervised tokens, cross-entropy, z-loss, balance statistics) go through
        one ``global_sum`` and every loss is rebuilt from the global sums."""
        mom = self.cfg.resolved_mom()
        B, T = logits.shape[:2]
        tokens = (attention_mask.sum().float() if attention_mask is not None
                  else torch.tensor(float(B * T), device=logits.device))
        pieces = [tokens.reshape(1)]
        if labels is not None:
            ce_sum = F.cross_entropy(upcast(logits.flatten(0, 1)), labels.flatten(), ignore_index=-100, reduction="sum")
            pieces += [ce_sum.reshape(1), (labels != -100).sum().float().reshape(1)]
        for a in auxes:  # z_loss is a mean over this rank's real tokens: back to a sum
            pieces.append((a.z_loss.float() * tokens).reshape(1))
            if a.balance is not None:
                pieces += [a.balance.counts.float(), a.balance.prob_sum.float()]
        flat = global_sum(torch.cat(pieces))
        g_tokens, i = flat[0], 1
        ce = None
        if labels is not None:
            ce, i = flat[1] / flat[2], 3
        out = []
        for a in auxes:
            z, i = flat[i] / g_tokens.clamp_min(1.0), i + 1
            balance, aux_loss = None, torch.zeros_like(z)
            if a.balance is not None:
                M = a.balance.counts.numel()
                balance = BalanceStats(flat[i:i + M], flat[i + M:i + 2 * M], g_tokens)
                aux_loss, i = mom.aux_loss_scale * load_balancing_loss([balance]), i + 2 * M
            out.append(dataclasses.replace(a, aux_loss=aux_loss, z_loss=z, balance=balance))
        return out, ce

    def _aux_loss(self, auxes: list[MoMAux], x: Tensor) -> Tensor:
        total = x.new_zeros((), dtype=torch.float32)
        if not auxes:
            return total
        total = total + sum(a.z_loss for a in auxes)
        mom = self.cfg.resolved_mom()
        balance = [a.balance for a in auxes if a.balance is not None]
        if balance and mom.aux_loss_scale > 0:
            if mom.layerwise_balance:  # mean of the per-layer losses
                total = total + sum(a.aux_loss for a in auxes) / len(auxes)
            else:  # one loss over the tokens of all layers together (the paper's code)
                total = total + mom.aux_loss_scale * load_balancing_loss(balance)
        return total

    def update_routing_biases(self) -> None:
        """Call after each optimizer step: nudges ``topk_sigmoid`` routers' biases toward balanced load."""
        for block in self.blocks:
            router = getattr(block.mixer, "router", None)
            if router is not None and hasattr(router, "update_bias"):
                router.update_bias()

    # ----------------------------------------------------------------------------------- decoding
    def init_cache(self, batch_size: int, capacity: int = 0) -> list:
        """Empty caches of every layer (decoding from the first token); ``capacity``: token slots to
        preallocate in attention layers' KV caches (a full cache doubles)."""
        w = self.embed.weight
        return [b.mixer.init_cache(batch_size, device=w.device, dtype=w.dtype,
                                   **({"capacity": capacity} if b.kind == "attention" else {})) for b in self.blocks]

    def step(self, token_ids: Tensor, cache: list) -> tuple[Tensor, list]:
        """One token per sequence: token_ids [B] -> (logits [B, vocab], cache). Every layer's cache is
        advanced in place (keep no reference to an earlier state of it); the list is returned."""
        x = self.embed(token_ids)
        new = []
        for block, c in zip(self.blocks, cache):
            x, c = block.step(x, c, token_ids)
            new.append(c)
        return self.head(self.norm(x)), new

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                 attention_mask: Tensor | None = None, generator: torch.Generator | None = None,
                 on_token: Callable[[Tensor], None] | None = None, cuda_graph: bool = False) -> Tensor:
        """Prefill with the parallel path, then decode with the recurrent cache. Greedy when
        temperature is 0. Prompts of different lengths: left-pad them and pass attention_mask.
        Attention layers preallocate KV slots for the prompt and the new tokens. ``on_token`` is called
        with each new token [B] as soon as it is chosen (streaming, progress). ``cuda_graph``: decode
        with the step captured as one CUDA graph (``momkit.models.graphs``; CUDA, no attention layers):
        the same results, far fewer host calls per token.
        Returns [B, prompt + max_new_tokens]."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be None or a positive int, got {top_k!r}")
        if not isinstance(cuda_graph, bool):
            raise ValueError(f"cuda_graph must be True or False, got {cuda_graph!r}")
        if cuda_graph:
            from momkit.models.graphs import capture_refusal

            why = capture_refusal(self)
            if why is not None:
                raise ValueError(f"cuda_graph=True {why}")
        out = self(input_ids, attention_mask=attention_mask, use_cache=True,
                   cache_capacity=input_ids.shape[1] + max_new_tokens, last_logits_only=True)
        cache, logits = out.cache, out.logits[:, -1]
        step = None
        if cuda_graph and max_new_tokens > 1:
            from momkit.models.graphs import CapturedStep

            step = CapturedStep(self, cache)
        tokens = [input_ids]
        for i in range(max_new_tokens):
            nxt = self._sample(logits, temperature, top_k, generator)
            tokens.append(nxt[:, None])
            if on_token is not None:
                on_token(nxt)
            if i + 1 < max_new_tokens:
                logits = step(nxt) if step is not None else self.step(nxt, cache)[0]
        return torch.cat(tokens, 1)

    @staticmethod
    def _sample(logits: Tensor, temperature: float, top_k: int | None, generator) -> Tensor:
        if temperature == 0:
            return logits.argmax(-1)
        logits = upcast(logits) / temperature
        if top_k is not None:
            kth = logits.topk(min(top_k, logits.shape[-1]), -1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]
