"""Dispatch and combine, written once for every rule and router.

Every used slot (token b, t routed to memory m; the shared memory is memory index M with weight 1)
becomes one row of a packed sequence. Rows are sorted, stably, by segment ``m * B + b`` — memory
first, so each memory's rows are contiguous for its own projections, then sequence, then time (the
stable sort keeps time order). Each (memory, sequence) pair is one segment of ``cu_seqlens``
(empty segments allowed), so a single call of the rule runs every memory of every sequence, each
from its own state and untouched by the others.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from momkit.rules._chunking import gather_rows, scatter_rows

Tensor = torch.Tensor


class _SlotGather(torch.autograd.Function):
    """Rows ``x[slot // k']`` of a per-token ``x [B, T, ...]``; the gradient of each token sums its slots'."""

    @staticmethod
    def forward(ctx, x: Tensor, slot: Tensor, slots: int) -> Tensor:
        ctx.save_for_backward(slot)
        ctx.shape, ctx.slots = x.shape, slots
        return x.reshape(-1, *x.shape[2:]).index_select(0, slot // slots)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (slot,) = ctx.saved_tensors
        B, T = ctx.shape[:2]
        grid = grad.new_zeros(B * T * ctx.slots, *grad.shape[1:]).index_copy_(0, slot, grad)
        return grid.view(B, T, ctx.slots, *grad.shape[1:]).sum(2), None, None


@dataclass
class Dispatch:
    batch: int
    seq_len: int
    num_segments_per_seq: int  # memories including the shared one
    slots: int  # slots per token k' (the shared memory included)
    slot: Tensor  # [N] flat slot index (b * T + t) * k' + j of each row (sorted; no repeats)
    weight: Tensor  # [N] mixing weight of each row's read
    segment: Tensor  # [N] segment id m * B + b
    cu_seqlens: Tensor  # [S + 1] int64 offsets, S = num_segments_per_seq * B
    offsets: tuple[int, ...]  # the same offsets on the host (rules take them without a device sync)
    memory_rows: list[tuple[int, int]]  # rows [start, stop) of each memory (incl. shared)
    _inverse: Tensor | None = None  # [B * T * k'] row of each slot, -1 where none (the fused kernels')
    _token: Tensor | None = None

    @property
    def num_rows(self) -> int:
        return self.slot.numel()

    @property
    def token(self) -> Tensor:
        """[N] flat token index b * T + t of each row (computed once)."""
        if self._token is None:
            self._token = self.slot // self.slots
        return self._token

    @property
    def position(self) -> Tensor:
        """[N] index of each row within its segment."""
        return torch.arange(self.num_rows, device=self.slot.device) - self.cu_seqlens[self.segment]

    @staticmethod
    def build(indices: Tensor, weights: Tensor, kept: Tensor, num_memories: int) -> Dispatch:
        """indices, weights, kept [B, T, k'] (k' slots per token, the shared memory included as a slot
        with index == num_memories - 1 if present); num_memories counts the shared memory too.

        Waits for the device once (the segment offsets, which size every later launch)."""
        B, T, k = indices.shape
        M = num_memories
        dev = indices.device
        b = torch.arange(B, device=dev).view(B, 1, 1)
        # dropped slots go to a last bucket, after every segment, that is cut off
        mem = torch.where(kept, indices, M).view(B, T * k)
        key = torch.where(kept, indices * B + b, M * B).reshape(-1)
        counts = torch.zeros(M * B + 1, dtype=torch.int64, device=dev).scatter_add_(0, key, torch.ones_like(key))
        cu = torch.zeros(M * B + 1, dtype=torch.int64, device=dev)
        cu[1:] = counts[:-1].cumsum(0)
        offsets = tuple(cu.tolist())
        order = Dispatch._bucket_order(mem, key, cu, M, offsets[-1])
        # the weights through an injective gather: its backward is a copy, where indexing's would sort the
        # indices for an accumulating scatter
        weight = gather_rows(weights.reshape(-1), order)
        return Dispatch(
            batch=B, seq_len=T, num_segments_per_seq=M, slots=k, slot=order, weight=weight,
            segment=key[order], cu_seqlens=cu, offsets=offsets,
            memory_rows=list(itertools.pairwise(offsets[:: B])),
        )

    @staticmethod
    def _bucket_order(mem: Tensor, key: Tensor, cu: Tensor, M: int, rows: int) -> Tensor:
        """The kept slots in the order of a stable sort by ``key`` (a counting sort): each slot's row is its
        segment's start plus the number of earlier slots of its sequence in the same memory. A segment holds one
        sequence's slots, so the count runs along the sequence: a few elementwise passes and a cumulative sum
        over ``[B, M + 1, T * k']`` instead of the several passes of a radix sort over all the slots. The sum
        runs along the last dimension: along a middle one, CUDA's scan gives each of the B * (M + 1) columns
        one thread (3 ms at B = 1, T = 8192 on an H100, against microseconds along the last)."""
        onehot = (mem[:, None, :] == torch.arange(M + 1, device=mem.device)[:, None]).to(torch.int32)
        rank = onehot.cumsum(2, dtype=torch.int32).gather(1, mem[:, None, :])[:, 0, :] - 1  # [B, T * k']
        row = cu[key] + rank.reshape(-1)
        row = torch.where(mem.reshape(-1) < M, row, rows)  # dropped slots: one spare row, cut off below
        order = torch.empty(rows + 1, dtype=torch.int64, device=mem.device)
        order.scatter_(0, row, torch.arange(key.numel(), device=mem.device))
        return order[:rows]

    @property
    def inverse(self) -> Tensor:
        """[B * T * k'] the row of each slot, -1 for a slot that holds none."""
        if self._inverse is None:
            inv = torch.full((self.batch * self.seq_len * self.slots,), -1, dtype=torch.int64, device=self.slot.device)
            self._inverse = inv.scatter_(0, self.slot, torch.arange(self.num_rows, device=self.slot.device))
        return self._inverse

    def gather(self, x: Tensor, fused: bool = False) -> Tensor:
        """Per-token tensor [B, T, ...] -> rows [N, ...]: a row gather forward; backward, each token's
        gradient sums its slots' (through the slot grid in torch, a copy into ``[B * T * k', ...]``; or one
        Triton kernel with ``fused``), so that no gradient is a scatter-add (deterministic on every device)."""
        if fused:
            from momkit.kernels.slots import gather

            rows = gather(x.reshape(-1, x[0, 0].numel()), self.token, self.inverse, self.slots)
            return rows.view(-1, *x.shape[2:])
        return _SlotGather.apply(x, self.slot, self.slots)

    def combine(self, rows: Tensor, fused: bool = False) -> Tensor:
        """Rows [N, ...] -> per-token weighted sum [B, T, ...] (tokens with no row get 0). ``fused``: one
        Triton kernel forward and one backward, without the slot grid."""
        if fused:
            from momkit.kernels.slots import combine

            out = combine(rows.reshape(self.num_rows, -1), self.weight, self.token, self.inverse, self.slots)
            return out.view(self.batch, self.seq_len, *rows.shape[1:])
        w = self.weight.to(rows.dtype).view(-1, *[1] * (rows.dim() - 1))
        grid = scatter_rows(rows * w, self.slot, self.batch * self.seq_len * self.slots)
        return grid.view(self.batch, self.seq_len, self.slots, *rows.shape[1:]).sum(2)

    def segment_tail(self, rows: Tensor, width: int) -> Tensor:
        """The last ``width`` rows of every segment, zero-padded in front: [S, width, ...]."""
        S = self.cu_seqlens.numel() - 1
        if rows.shape[0] == 0:
            return rows.new_zeros(S, width, *rows.shape[1:])
        end = self.cu_seqlens[1:]
        idx = end[:, None] - width + torch.arange(width, device=rows.device)  # [S, width]
        valid = idx >= self.cu_seqlens[:-1, None]
        picked = rows.index_select(0, idx.clamp_min(0).reshape(-1)).view(S, width, *rows.shape[1:])
        return picked * valid.view(S, width, *[1] * (rows.dim() - 1)).to(rows.dtype)
