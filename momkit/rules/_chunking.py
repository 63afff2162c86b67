"""Chunk layout shared by every rule's ``chunked`` path.

A batch ``[B, T]`` or a packed variable-length input ``[1, T]`` with ``cu_seqlens`` is a list of
independent segments. Each segment is cut into chunks of ``C`` tokens (the last one padded with
the rule's neutral values), and the chunks of all segments become the rows of one flat tensor
``[R, H, C, D]``. Everything that does not depend on the carried state (the intra-chunk part) is
computed once for all rows; the state is then carried through a short loop over the chunk index
``j``: at step ``j`` the segments that still have a ``j``-th chunk are advanced together.

Segments are sorted by their number of chunks (descending, stable), so the active segments at step
``j`` are a prefix of the sorted list and the rows of step ``j`` are contiguous. The loop therefore
runs ``max_chunks`` times, not ``R`` times, and its work is proportional to the real tokens, however
unequal the segment lengths (as in a Mixture-of-Memories dispatch).

Axis letters: R chunk rows, H heads, C chunk length, K key dim, V value dim, N segments.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

Tensor = torch.Tensor


@dataclass
class ChunkPlan:
    """Where every token goes in the flat chunk layout, and the order of the state scan."""

    chunk_size: int
    num_tokens: int
    order: Tensor  # [N] segment ids sorted by number of chunks, descending
    steps: list[tuple[int, int]]  # per chunk index j: (first row, number of rows)
    dst: Tensor  # [num_tokens] padded position of each token
    valid: Tensor  # [R] number of real tokens in each row
    # (segments, length) when all segments have one length and follow each other: rows are then
    # a reshape of the input, no gather needed
    regular: tuple[int, int] | None = None

    @property
    def num_rows(self) -> int:
        return self.valid.numel()

    @property
    def num_never_active(self) -> int:
        """Segments with no token (their final state is their initial state)."""
        return self.order.numel() - (self.steps[0][1] if self.steps else 0)


def make_plan(lengths: list[int], starts: list[int], chunk_size: int, device: torch.device) -> ChunkPlan:
    """Plan for segments ``i`` covering tokens ``starts[i] : starts[i] + lengths[i]`` (cached)."""
    return _make_plan(tuple(lengths), tuple(starts), chunk_size, device)


@functools.lru_cache(maxsize=64)
def _make_plan(lengths: tuple[int, ...], starts: tuple[int, ...], chunk_size: int, device: torch.device) -> ChunkPlan:
    C = chunk_size
    n_chunks = [(L + C - 1) // C for L in lengths]
    order = sorted(range(len(lengths)), key=lambda i: -n_chunks[i])  # sorted() is stable
    seg_rows: list[int] = []
    j_rows: list[int] = []
    steps = []
    for j in range(max(n_chunks, default=0)):
        active = [i for i in order if n_chunks[i] > j]
        steps.append((len(seg_rows), len(active)))
        seg_rows += active
        j_rows += [j] * len(active)
    seg = torch.tensor(seg_rows, dtype=torch.long)
    jj = torch.tensor(j_rows, dtype=torch.long)
    L = torch.tensor(lengths, dtype=torch.long)[seg]
    offset = jj * C
    pos = offset[:, None] + torch.arange(C)[None, :]
    real = pos < L[:, None]
    tok = torch.tensor(starts, dtype=torch.long)[seg][:, None] + pos
    num_tokens = sum(lengths)
    flat = torch.arange(real.numel()).view(real.shape)
    dst = torch.empty(num_tokens, dtype=torch.long)
    dst[tok[real]] = flat[real]
    valid = (L - offset).clamp(max=C)
    same = len(set(lengths)) == 1 and starts == tuple(i * lengths[0] for i in range(len(lengths)))
    return ChunkPlan(
        chunk_size=C,
        num_tokens=num_tokens,
        order=torch.tensor(order, dtype=torch.long, device=device),
        steps=steps,
        dst=dst.to(device),
        valid=valid.to(device),
        regular=(len(lengths), lengths[0]) if same and lengths[0] > 0 else None,
    )


class _InjectiveGather(torch.autograd.Function):
    """``x.index_select(0, index)`` for an index without repeats: the backward is a copy into
    zeros (a gather, parallel) instead of the scatter-add autograd would use."""

    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor) -> Tensor:
        ctx.save_for_backward(index)
        ctx.rows = x.shape[0]
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (index,) = ctx.saved_tensors
        return grad.new_zeros(ctx.rows, *grad.shape[1:]).index_copy_(0, index, grad), None


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """Rows ``x[index]`` where ``index`` holds no repeats (a permutation or a selection)."""
    return _InjectiveGather.apply(x, index)


def scatter_rows(x: Tensor, index: Tensor, rows: int, fill: float = 0.0) -> Tensor:
    """A ``[rows, ...]`` tensor filled with ``fill`` whose rows ``index`` (no repeats) are ``x``;
    the inverse of ``gather_rows`` (its backward is a gather)."""
    out = torch.full((rows, *x.shape[1:]), fill, dtype=x.dtype, device=x.device)
    return out.index_copy_(0, index, x)  # in place on the fresh tensor: no second full-size copy


def to_rows(x: Tensor, plan: ChunkPlan, neutral: float) -> Tensor:
    """Packed ``[num_tokens, H, *D]`` -> contiguous chunk rows ``[R, H, C, *D]``, padded with ``neutral``."""
    C, tail = plan.chunk_size, x.shape[1:]
    if plan.regular is not None:
        n_seg, L = plan.regular
        n = -(-L // C)
        x = x.view(n_seg, L, *tail)
        if n * C != L:
            pad = torch.full((n_seg, n * C - L, *tail), neutral, dtype=x.dtype, device=x.device)
            x = torch.cat([x, pad], 1)
        # chunk-major rows (row = j * n_seg + segment), heads before tokens: one copy
        extra = tuple(range(4, 3 + len(tail)))  # the dims after H
        x = x.view(n_seg, n, C, *tail).permute(1, 0, 3, 2, *extra).contiguous()
        return x.view(plan.num_rows, *x.shape[2:])
    x = scatter_rows(x, plan.dst, plan.num_rows * C, neutral).view(plan.num_rows, C, *tail)
    return x.transpose(1, 2).contiguous()


def from_rows(o: Tensor, plan: ChunkPlan) -> Tensor:
    """Chunk rows ``[R, H, C, V]`` -> packed ``[num_tokens, H, V]``."""
    R, H, C, V = o.shape
    if plan.regular is not None:
        n_seg, L = plan.regular
        o = o.view(R // n_seg, n_seg, H, C, V).permute(1, 0, 3, 2, 4)  # [n_seg, chunks, C, H, V]
        if o.shape[1] * C == L:
            return o.reshape(plan.num_tokens, H, V)  # one copy
        return o.reshape(n_seg, -1, H, V)[:, :L].reshape(plan.num_tokens, H, V)
    return gather_rows(o.transpose(1, 2).reshape(R * C, H, V), plan.dst)


def scan_chunks(
    plan: ChunkPlan,
    initial_state: Tensor,
    step: Callable[[slice, Tensor], tuple[Tensor, Tensor]],
) -> tuple[Tensor, Tensor]:
    """Carry the state through the chunks.

    ``step(rows, S)`` gets the row slice of chunk index ``j`` and the states ``S`` of the segments
    active at ``j`` (in row order), and returns ``(y, S_next)``: anything per row (the rows' outputs,
    or ``S`` itself when the outputs are cheaper in one batch afterwards; a tensor or a tuple of
    tensors) and their next states. Returns ``y`` of all rows ``[R, ...]`` (a tuple if ``step``'s
    is) and the final state of every segment, in segment order.
    """
    S = gather_rows(initial_state, plan.order)
    pieces = [S[S.shape[0] - plan.num_never_active :]]
    S = S[: S.shape[0] - plan.num_never_active]
    ys = []
    for j, (first, n) in enumerate(plan.steps):
        y, S = step(slice(first, first + n), S)
        ys.append(y)
        n_next = plan.steps[j + 1][1] if j + 1 < len(plan.steps) else 0
        pieces.append(S[n_next:])
        S = S[:n_next]
    final_sorted = torch.cat(pieces[::-1])
    inverse = torch.empty_like(plan.order)
    inverse[plan.order] = torch.arange(plan.order.numel(), device=plan.order.device)
    y = tuple(map(torch.cat, zip(*ys))) if ys and isinstance(ys[0], tuple) else torch.cat(ys)
    return y, gather_rows(final_sorted, inverse)


def causal_mask(C: int, device: torch.device, strict: bool = False) -> Tensor:
    """``[C, C]`` boolean mask, True where the key index j may feed the query index i (j <= i)."""
    return torch.ones(C, C, dtype=torch.bool, device=device).tril(-1 if strict else 0)


# Decay factors below exp(-60) ~ 9e-27 are returned as exactly 0. The difference is below float64
# resolution, and it keeps float32 arithmetic out of the denormal range, where x86 CPUs run many
# times slower (a training step of a decaying rule was seen to take 80x longer).
LOG_DECAY_FLOOR = -60.0


def decay_exp(x: Tensor) -> Tensor:
    """``exp(x)`` of a log decay, exactly 0 where ``x < LOG_DECAY_FLOOR``."""
    return torch.where(x > LOG_DECAY_FLOOR, x, float("-inf")).exp()


def decay_exp_(x: Tensor) -> Tensor:
    """``decay_exp`` in place, for a fresh tensor that nothing else holds (one pass less)."""
    return x.masked_fill_(x <= LOG_DECAY_FLOOR, float("-inf")).exp_()


def flush_tiny(x: Tensor, floor: float = 1e-26) -> Tensor:
    """Products of decays (cumulative products) with values below ``floor`` set to 0 (see decay_exp)."""
    return torch.where(x.abs() < floor, torch.zeros_like(x), x)


def decay_matrix(G: Tensor, strict: bool = False) -> Tensor:
    """``exp(G_i - G_j)`` for ``j <= i`` (``j < i`` if strict), 0 elsewhere. ``G``: ``[..., C]``.

    The exponent is masked before ``exp`` so the unused upper triangle can never overflow.
    """
    C = G.shape[-1]
    diff = G[..., :, None] - G[..., None, :]  # a fresh tensor: masked and exponentiated in place
    return decay_exp_(diff.masked_fill_(~causal_mask(C, G.device, strict), float("-inf")))
